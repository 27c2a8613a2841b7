"""Architectures of released Qwen3 base models (their HF config.json numbers), for dry runs and
benchmarks where no checkpoint is on disk, and `model_config_for`: a run's ModelConfig (the
checkpoint's config.json when there is one, else the preset)."""
from __future__ import annotations

import json

from masa_jax import fs
from masa_jax.models.qwen.config import ModelConfig

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960, head_dim=128, num_key_value_heads=8, bos_token_id=151643,
              eos_token_id=151643)

PRESETS: dict[str, dict] = {
    # Qwen/Qwen3-0.6B-Base config.json (0.60 B params, 0.44 B without the tied embedding).
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, tie_word_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a released architecture by name (see PRESETS)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig.from_hf_dict(PRESETS[name], **overrides)


def model_config_for(config) -> ModelConfig:
    """The run's ModelConfig from the checkpoint's config.json, or from `model.preset` without one."""
    overrides = dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype, remat=config.model.remat,
                     scan_unroll=config.model.scan_unroll, scan_layers=config.model.scan_layers,
                     attention_impl=config.model.attention_impl)
    cfg_path = fs.join(config.model.path, "config.json")
    if config.model.path and fs.exists(cfg_path):
        return ModelConfig.from_hf_dict(json.loads(fs.read_text(cfg_path)), **overrides)
    if config.model.preset:
        return preset(config.model.preset, **overrides)
    raise FileNotFoundError(f"{cfg_path} not found and config.model.preset is empty")
