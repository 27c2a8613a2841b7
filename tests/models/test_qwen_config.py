"""ModelConfig.from_hf_dict / to_hf_dict: both rope_theta layouts, rejected configs, round trip."""
from __future__ import annotations

import pytest

from masa_jax.models.qwen import ModelConfig, UnsupportedConfigError

BASE = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "max_position_embeddings": 4096, "eos_token_id": [7, 8], "bos_token_id": 1}


def test_rope_theta_in_both_layouts():
    v5 = ModelConfig.from_hf_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    v4 = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5})
    both = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5, "rope_parameters": {"rope_theta": 2e5}})
    assert (v5.rope_theta, v4.rope_theta, both.rope_theta) == (1e6, 5e5, 2e5)
    assert ModelConfig.from_hf_dict(BASE).rope_theta == 10000.0  # HF's default when absent


def test_fields():
    cfg = ModelConfig.from_hf_dict(BASE)
    assert (cfg.family, cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings) == ("qwen3", 16, 2, True)
    assert cfg.eos_token_id == (7, 8) and cfg.rms_norm_eps == 1e-5 and cfg.qk_norm and not cfg.qkv_bias
    qwen2 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                      "head_dim": None})
    assert qwen2.family == "qwen2" and qwen2.head_dim == 16 and qwen2.qkv_bias and not qwen2.qk_norm
    hash(cfg)  # a static jit argument


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unknown architecture"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_rejects_unsupported(change, match):
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf_dict({**BASE, **change})


def test_round_trip_and_overrides():
    cfg = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5}, dtype="bfloat16", remat="full")
    assert (cfg.dtype, cfg.remat) == ("bfloat16", "full")
    back = ModelConfig.from_hf_dict(cfg.to_hf_dict(), dtype="bfloat16", remat="full")
    assert back == cfg
    with pytest.raises(ValueError, match="remat"):
        cfg.replace(remat="sometimes")


def test_reads_real_transformers_configs():
    from transformers import Qwen2Config, Qwen3Config

    q3 = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_parameters={"rope_type": "default", "rope_theta": 3e5}).to_dict()
    q3["architectures"] = ["Qwen3ForCausalLM"]
    cfg = ModelConfig.from_hf_dict(q3)
    assert (cfg.family, cfg.rope_theta, cfg.head_dim) == ("qwen3", 3e5, 16)
    q2 = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2).to_dict()
    cfg2 = ModelConfig.from_hf_dict(q2)  # architectures None: falls back to model_type
    assert (cfg2.family, cfg2.head_dim) == ("qwen2", 16)
