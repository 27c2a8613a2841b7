"""Shared fixtures of the trainer tests: a tiny random Qwen3 on the toy tokenizer, and a small config."""
from __future__ import annotations

import os
import sys

import jax
import pytest

from masa_jax.models import qwen
from masa_jax.toy import tokenizer as toy_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_config import make_small_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen3 over the toy tokenizer, saved as a complete HF directory."""
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    tok = toy_tokenizer.load_tokenizer()
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                           max_position_embeddings=1024, eos_token_id=tok.eos_token_id)
    params = qwen.init_params(cfg, jax.random.key(0))
    qwen.save_pretrained(cfg, params, path, tokenizer_dir=toy_tokenizer.TOKENIZER_DIR)
    return path


@pytest.fixture
def small_config():
    """`small_config(model_dir, algorithm, **dotted_overrides)` -> a ConfigDict."""
    return make_small_config
