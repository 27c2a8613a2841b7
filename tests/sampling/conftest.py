"""Fixtures for the sampler tests: tiny random float32 HF Qwen3 / Qwen2 models built offline, their
params in our layout, and `transformers` greedy references.

Weights are drawn wider than HF's init (std 0.3) so greedy continuations vary from token to token
instead of repeating one id, which would make token-for-token parity a weak check. Every engine call in
these tests uses the same static shapes (GEN below) so the suite compiles each executable once.
"""
from __future__ import annotations

import numpy as np
import pytest

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
# Shared generate() settings: 2 slots, a fixed cache length and output length -> one set of executables.
MAX_NEW = 12
GEN = dict(num_slots=2, max_cache_len=64, max_new_tokens=MAX_NEW)
PROMPT_LENS = (3, 7, 1, 12, 5)


def _build(kind: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0 if kind == "qwen3" else 1)
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True, rope_parameters=rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False, rope_parameters=rope))
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class Tiny:
    """One tiny model: HF module, our config / params, prompts, HF greedy continuations and the shared
    generate() settings (`gen`), handed to tests through fixtures (test modules cannot import conftest)."""

    def __init__(self, kind: str):
        import jax
        import jax.numpy as jnp
        import torch

        from masa_jax.models import qwen
        from masa_jax.models.qwen.params import params_from_state_dict

        self.max_new = MAX_NEW
        self.gen = dict(GEN)
        self.hf = _build(kind)
        self.cfg = qwen.ModelConfig.from_hf_dict(self.hf.config.to_dict())
        state = {k: v.detach().numpy() for k, v in self.hf.state_dict().items()}
        self.params = jax.tree.map(jnp.asarray, params_from_state_dict(self.cfg, state))
        rs = np.random.RandomState(7)
        self.prompts = [rs.randint(0, TINY["vocab_size"], n).tolist() for n in PROMPT_LENS]
        self.greedy = []  # HF greedy continuation of each prompt, MAX_NEW tokens, no EOS
        for p in self.prompts:
            with torch.no_grad():
                out = self.hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                       do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                       eos_token_id=None, pad_token_id=0)
            self.greedy.append(out[0, len(p):].tolist())


@pytest.fixture(scope="session")
def qwen3_tiny():
    return Tiny("qwen3")


@pytest.fixture(scope="session")
def qwen2_tiny():
    return Tiny("qwen2")
