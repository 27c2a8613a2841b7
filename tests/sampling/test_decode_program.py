"""The compiled decode step (engine.decode, XLA CPU) reads the weights in place: no transposed copy of
a weight inside the decode loop. Before, XLA transposed the tied embedding (for the logits) and every
layer's o_proj (to the attention output's layout) in every step: at batch 1, 2 MB of copies per token
on the bench_peer model (docs/benchmarks.md)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax import sampling
from masa_jax.models import qwen
from masa_jax.sampling import engine, kv_cache
from masa_jax.sampling.sampling_fns import SamplingMode


@pytest.mark.parametrize("tied", [True, False])
def test_no_weight_transpose_in_the_decode_loop(tied):
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    shapes = qwen.param_shapes(cfg)
    params = jax.tree.map(lambda s: jnp.asarray(np.random.RandomState(0).randn(*s.shape) * 0.1, jnp.float32), shapes)
    sp = sampling.to_sampling_params(cfg, params)
    spec = engine.EngineSpec(cfg, 1, 16, SamplingMode(greedy=True))
    cache = kv_cache.init_cache(cfg, 1, 64, jnp.float32)
    knobs = engine.Knobs(rng=jax.random.key(0), temperature=jnp.float32(1), top_p=jnp.float32(1),
                         eos_ids=jnp.full((4,), -1, jnp.int32))
    hlo = engine.decode.lower(spec, sp, cache, engine.init_state(1, 16), knobs, jnp.int32(2)).compile().as_text()
    transposed = [m.group(1) for m in re.finditer(r"= (f32\[[0-9,]+\])\{[0-9,]+\} copy\(%transpose", hlo)]
    assert "while" in hlo
    # Before: f32[64,256] (the tied table) and f32[16,4,64] per layer (o_proj, head_dim-major).
    assert not transposed, transposed
