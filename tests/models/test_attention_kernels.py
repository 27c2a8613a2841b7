"""Pallas TPU attention kernels (`attention_impl="pallas"`) against the XLA path, on CPU in Pallas
interpret mode (`pallas_interpret=True`), float32, small shapes.

* splash attention (training / prefill): causal + segment ids for left / right padding, GQA; outputs
  and gradients on real positions, padding rows zeroed;
* paged-attention decode kernel: one query per slot over ragged cache lengths;
* model level: `qwen.forward` and `sampling.generate` (greedy) with the kernels vs XLA.

Splash blocks are multiples of 128 (the kernel's minimum), so sequences are padded to 128 inside.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax import sampling
from masa_jax.models import qwen
from masa_jax.models.qwen import attention as attn_lib
from masa_jax.models.qwen.logprobs import shared_prefix_logprobs
from masa_jax.rl import batching
from masa_jax.sampling import kv_cache

CFG = qwen.ModelConfig(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=5000.0)
PALLAS = dict(attention_impl="pallas", pallas_interpret=True)
H, KV, HD = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim


def _qkv(rng, B, T):
    f = lambda *s: jnp.asarray(rng.randn(*s), jnp.float32)
    return f(B, T, H, HD), f(B, T, KV, HD), f(B, T, KV, HD)


def _padding(T, real, left):
    """bool [B, T]: row b has real[b] real tokens, after (left) or before (right) the padding."""
    valid = np.zeros((len(real), T), bool)
    for b, n in enumerate(real):
        if left:
            valid[b, T - n:] = True
        else:
            valid[b, :n] = True
    return valid


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_splash_matches_xla(left):
    """Sequence attention (training: left padding; prefill: right padding): splash == XLA on real
    positions, in the forward and in q / k / v gradients of a loss over real positions."""
    rng = np.random.RandomState(0)
    B, T = 3, 20
    q, k, v = _qkv(rng, B, T)
    valid = _padding(T, [20, 13, 1], left)
    w = jnp.asarray(rng.randn(B, T, H, HD), jnp.float32) * valid[:, :, None, None]

    def run(cfg):
        attend = attn_lib.sequence_attention(cfg, jnp.asarray(valid))
        out = lambda q, k, v: attend(q, k, v)[0]
        loss = lambda q, k, v: jnp.sum(out(q, k, v) * w)
        return out(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    ref, ref_g = jax.jit(lambda: run(CFG))()
    out, g = jax.jit(lambda: run(CFG.replace(**PALLAS)))()
    diff = float(jnp.abs(out - ref)[valid].max())
    print(f"splash {'left' if left else 'right'} padding: out max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert np.all(np.asarray(out)[~valid] == 0)              # padding rows zeroed, no NaN
    for name, a, b in zip("qkv", g, ref_g):
        gd = float(jnp.abs(a - b).max())
        print(f"  d{name} max abs diff {gd:.2e} (scale {float(jnp.abs(b).max()):.2f})")
        assert np.isfinite(np.asarray(a)).all() and gd <= 1e-5


def test_paged_decode_matches_dense():
    """The paged decode kernel == dense-cache decode attention over ragged lengths (1 .. C, and C + 1
    for a finished slot, which sees the whole cache). K / V are bfloat16 values held in float32: the
    kernel reads K / V as bfloat16 (the sampler only pages a bfloat16 cache), so both paths see the
    same numbers and any difference is the kernel's arithmetic."""
    rng = np.random.RandomState(1)
    S, C = 5, 96                                   # 96: 3 pages of 32 per slot
    q = jnp.asarray(rng.randn(S, H, HD), jnp.float32)
    kc = jnp.asarray(rng.randn(S, KV, C, HD), jnp.bfloat16).astype(jnp.float32)
    vc = jnp.asarray(rng.randn(S, KV, C, HD), jnp.bfloat16).astype(jnp.float32)
    lengths = jnp.array([1, 96, 33, 64, 97], jnp.int32)
    ref = kv_cache.decode_attention(q, jnp.swapaxes(kc, 2, 3), vc, lengths)
    pc = CFG.replace(**PALLAS)
    out = jax.jit(lambda *a: attn_lib.paged_decode_attention(pc, *a))(
        q, jnp.swapaxes(kc, 0, 1), jnp.swapaxes(vc, 0, 1), lengths)
    diff = float(jnp.abs(out - ref).max())
    print(f"paged decode: max abs diff {diff:.2e}; paging (page, pages/block) = {attn_lib.decode_paging(C)}")
    assert diff <= 1e-5


def _params(cfg, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map_with_path(
        lambda path, s: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + 0.3 * rng.randn(*s.shape), jnp.float32),
        qwen.param_shapes(cfg))


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_forward_pallas_matches_xla(family):
    cfg = CFG.replace(family=family, remat="full")
    params = _params(cfg)
    rng = np.random.RandomState(2)
    T = 11
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (3, T)), jnp.int32)
    mask = np.ones((3, T), bool)
    mask[1, :4] = False
    mask[2, :9] = False
    fwd = jax.jit(qwen.forward, static_argnums=0)
    ref = fwd(cfg, params, tokens, jnp.asarray(mask))
    out = fwd(cfg.replace(**PALLAS), params, tokens, jnp.asarray(mask))
    diff = float(jnp.abs(out - ref)[mask].max())
    print(f"forward {family}: logits max abs diff on real tokens {diff:.2e}")
    assert diff <= 1e-5
    assert np.isfinite(np.asarray(out)).all()


def test_generate_greedy_pallas_matches_xla():
    """Prefill (splash) + decode (paged kernel) vs XLA: identical greedy tokens, same log-probs. Both
    with a bfloat16 cache, the layout the kernel pages; 2 slots for 5 prompts, so refill runs."""
    params = _params(CFG, seed=3)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, CFG.vocab_size, n).tolist() for n in (3, 7, 1, 12, 5)]
    kw = dict(rng=jax.random.key(0), temperature=0.0, max_new_tokens=10, budgets=[10, 4, 10, 7, 10],
              num_slots=2, max_cache_len=64, cache_dtype=jnp.bfloat16)
    pc = CFG.replace(**PALLAS)
    assert kv_cache.init_cache(pc, 2, 64, jnp.bfloat16).paged
    ref = sampling.generate(CFG, params, prompts, **kw)
    out = sampling.generate(pc, params, prompts, **kw)
    assert out.tokens == ref.tokens and out.finish_reasons == ref.finish_reasons
    assert sum(map(len, out.tokens)) == 41 and len({t for s in out.tokens for t in s}) > 5
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out.logprobs, ref.logprobs))
    print(f"generate greedy: tokens identical, log-prob max abs diff {diff:.2e}")
    # Not 1e-5: a key / value whose float32 value differs in the last bit between the two programs (the
    # attention before it differs at float32 rounding) can round to a neighbouring bfloat16 in the cache.
    assert diff <= 1e-4


def test_pallas_off_tpu_falls_back_to_xla(caplog):
    """Without interpret mode, "pallas" on CPU is the XLA path (bit for bit) with a warning; a float32
    cache keeps the dense layout."""
    attn_lib._warned.clear()
    cfg = CFG.replace(attention_impl="pallas")
    with caplog.at_level(logging.WARNING, logger=attn_lib.__name__):
        assert not attn_lib.use_pallas(cfg)
    assert "needs a TPU" in caplog.text
    params = _params(CFG)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    fwd = jax.jit(qwen.forward, static_argnums=0)
    assert np.array_equal(fwd(cfg, params, tokens), fwd(CFG, params, tokens))
    assert not kv_cache.init_cache(CFG.replace(**PALLAS), 2, 64, jnp.float32).paged
    with pytest.raises(ValueError, match="attention_impl"):
        CFG.replace(attention_impl="flash")


def test_block_and_page_choices():
    assert attn_lib.splash_block(11) == (128, 128)
    assert attn_lib.splash_block(600) == (640, 128)
    assert attn_lib.splash_block(1024) == (1024, 512)
    assert attn_lib.splash_block(768) == (768, 256)
    # cache buckets are multiples of 32; blocks of <= 512 keys
    assert attn_lib.decode_paging(64) == (64, 1)
    assert attn_lib.decode_paging(96) == (32, 3)
    assert attn_lib.decode_paging(4096) == (64, 8)


@pytest.mark.slow
def test_pallas_kernels_on_a_mesh():
    """Under a (1, 2, 2) mesh of 4 CPU devices the kernels run per shard (shard_map); with 2 kv heads
    (split over tensor like the query heads) and 1 (replicated). Subprocess: fake devices need XLA_FLAGS
    before jax starts."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    script = Path(__file__).with_name("sharded_pallas_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    print(r)
    assert r["device_count"] == 4
    for kv in ("kv2", "kv1"):
        x = r[kv]
        assert x["shard_map_in_hlo"]
        assert x["splash_max_diff"] <= 1e-5 and x["paged_max_diff"] <= 1e-5 and x["forward_max_diff"] <= 1e-5
        assert x["greedy_equal"]
        # Log-probs after several decode steps: the bfloat16 cache rounds keys / values that differ in
        # their last float32 bit between the two programs to neighbouring bfloat16 values; one decode
        # step on the same cache agrees to float32 rounding (checked by the kernel diffs above).
        assert x["max_logprob_diff"] <= 1e-3


def test_shared_prefix_splash_matches_xla():
    """The shared-prefix forward's attention (`shared_prefix_attention`: prefixes causal, each response
    over its own prefix and causally over itself) with splash (prefix and suffix lengths padded to 128
    apart, a causal mask offset by the padded prefix) against XLA: log-probs and gradients."""
    rng = np.random.RandomState(3)
    prompts = [rng.randint(1, CFG.vocab_size, n).tolist() for n in (5, 9)]
    seqs = [(prompts[i % 2], rng.randint(1, CFG.vocab_size, int(rng.randint(1, 7))).tolist()) for i in range(6)]
    b, place = batching.pack_shared([p for p, _ in seqs], [r for _, r in seqs], pad_id=0, rows_per_block=3)
    params = qwen.init_params(CFG, jax.random.key(2), std=0.1)
    mask = jnp.asarray(b["attention_mask"])

    def loss(p, cfg):
        lp = shared_prefix_logprobs(cfg, p, b["prefix_tokens"], b["prefix_mask"], b["tokens"], b["attention_mask"],
                                    b["prefix_index"], chunk_size=8)
        return jnp.sum(jnp.where(mask, lp, 0.0)), lp

    pallas_cfg = dataclasses.replace(CFG, **PALLAS)
    (l_x, lp_x), g_x = jax.value_and_grad(loss, has_aux=True)(params, CFG)
    (l_p, lp_p), g_p = jax.value_and_grad(loss, has_aux=True)(params, pallas_cfg)
    np.testing.assert_allclose(np.asarray(lp_p)[b["attention_mask"]], np.asarray(lp_x)[b["attention_mask"]],
                               rtol=1e-4, atol=1e-5)
    for a, c in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, c, atol=1e-4 * float(np.max(np.abs(c))) + 1e-7)
    assert np.all(np.isfinite(np.asarray(lp_p)))
