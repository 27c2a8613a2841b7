"""A training run's policy as an HF model directory (verl's model merger, for our checkpoints).

    python -m masa_jax.export --checkpoint=runs/masa_efficient --output=runs/masa_efficient_hf
    python -m masa_jax.export --checkpoint=RUN --output=DIR --dtype=float32 --config=configs/qwen8b.py

The run's own config.json (in its workdir) says which base model and LoRA settings it used; --config
replaces it (for a checkpoints/ folder copied away from its workdir). The newest checkpoint is written
with `qwen.save_pretrained`: weights, config.json, generation_config.json and the run's tokenizer
files, which `transformers` and vLLM load alone. A LoRA run writes its merged weights the same way
and, in `OUTPUT/adapter/`, the adapters in PEFT's layout (`peft.PeftModel.from_pretrained` on the base;
`--nopeft_adapter` skips it). A QLoRA run's merged weights are its quantized base, dequantized, plus the
adapters: the policy it trained.
"""
from __future__ import annotations

import logging

from masa_jax import errors, fs


def export(config, checkpoint: str, output: str, *, dtype: str = "bfloat16", peft_adapter: bool = True) -> str:
    """Writes the newest checkpoint of the run at `checkpoint` (`config`: its resolved config) to `output`
    as an HF directory; returns `output` (absolute)."""
    import jax.numpy as jnp

    from masa_jax.evaluation import policy
    from masa_jax.models import qwen
    from masa_jax.models.qwen import lora

    output = fs.absolute(output)
    if fs.isdir(output) and _entries(output):
        raise errors.UserError(f"--output {output} exists and is not empty: pass a new directory")
    model_cfg, state, lora_cfg, _ = policy.restore_run(config, checkpoint)
    tokenizer = config.model.tokenizer_path or config.model.path
    if lora_cfg is None:
        qwen.save_pretrained(model_cfg, state.params, output, dtype=jnp.dtype(dtype), tokenizer_dir=tokenizer)
    else:
        lora.save_pretrained(model_cfg, lora_cfg, state.base_params, state.params, output,
                             base_model_path=config.model.path, peft_adapter=peft_adapter, dtype=jnp.dtype(dtype),
                             tokenizer_dir=tokenizer)
    return output


def _entries(p: str) -> list[str]:
    return sorted(x.name for x in fs.path(p).iterdir())


def run_export(F) -> str:
    from masa_jax import config as config_lib
    from masa_jax.evaluation import policy

    policy.check_checkpoint(F.checkpoint)
    if errors.is_hf_dir(F.checkpoint):
        raise errors.UserError(f"--checkpoint {F.checkpoint} is already an HF model directory: nothing to export")
    config = errors.config_from_flags(F) if F.config is not None else policy.run_config(F.checkpoint)
    if config is None:
        raise errors.UserError(f"{F.checkpoint} holds no run config.json (a training workdir has one): pass "
                               "--config=configs/<name>.py, the config the run trained with")
    if F.dtype not in ("bfloat16", "float16", "float32"):
        raise errors.UserError(f"--dtype must be bfloat16, float16 or float32, got {F.dtype!r}")
    out = export(config_lib.resolve(config), F.checkpoint, F.output, dtype=F.dtype, peft_adapter=F.peft_adapter)
    print(f"exported {F.checkpoint} -> {out}: {_entries(out)}")
    return out


def main(argv):
    from absl import flags
    del argv
    run_export(flags.FLAGS)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "the run's config file (default: the run's config.json)",
                                    lock_config=False)
    flags.DEFINE_string("checkpoint", None, "training run workdir or its checkpoints/ folder")
    flags.DEFINE_string("output", None, "the HF directory to write (new or empty)")
    flags.DEFINE_string("dtype", "bfloat16", "dtype of the written weights: bfloat16, float16 or float32")
    flags.DEFINE_boolean("peft_adapter", True, "LoRA runs: also write OUTPUT/adapter/ in PEFT's layout")
    flags.mark_flags_as_required(["checkpoint", "output"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    errors.run_cli(main, _define_flags)
