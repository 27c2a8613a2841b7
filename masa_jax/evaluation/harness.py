"""lm-eval's command line with the ``masa_jax`` model registered: the same flags as ``lm_eval``.

    python -m masa_jax.evaluation.harness --model masa_jax \
        --model_args pretrained=/data/Qwen3-8B-Base,dtype=bfloat16 --tasks gsm8k --batch_size 64

lm-eval's own executable only knows the models of its fixed table (no plugin discovery in 0.4.x), so
this module imports `masa_jax.evaluation.lm_eval_backend` (which registers the model) and then runs
lm-eval's CLI entry point unchanged. Needs the extra ``masa_jax[eval]``. A user error (a bad
``pretrained``, an unknown model_args field) ends it with one line and exit code 2, as the other tools;
MASA_JAX_DEBUG=1 shows the traceback.
"""
from __future__ import annotations


def main() -> None:
    import os
    import sys
    import traceback

    from masa_jax import errors
    from masa_jax.evaluation import lm_eval_backend  # noqa: F401  (registers "masa_jax")
    from lm_eval.__main__ import cli_evaluate
    try:
        cli_evaluate()
    except errors.UserError as e:
        if os.environ.get("MASA_JAX_DEBUG") == "1":
            traceback.print_exc()
        print(f"error: {errors.one_line(e)}", file=sys.stderr)
        sys.exit(errors.EXIT_CODE)


if __name__ == "__main__":
    main()
