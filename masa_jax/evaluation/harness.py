"""lm-eval's command line with the ``masa_jax`` model registered: the same flags as ``lm_eval``.

    python -m masa_jax.evaluation.harness --model masa_jax \
        --model_args pretrained=/data/Qwen3-8B-Base,dtype=bfloat16 --tasks gsm8k --batch_size 64

lm-eval's own executable only knows the models of its fixed table (no plugin discovery in 0.4.x), so
this module imports `masa_jax.evaluation.lm_eval_backend` (which registers the model) and then runs
lm-eval's CLI entry point unchanged. Needs the extra ``masa_jax[eval]``.
"""
from __future__ import annotations


def main() -> None:
    from masa_jax.evaluation import lm_eval_backend  # noqa: F401  (registers "masa_jax")
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
