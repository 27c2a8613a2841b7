"""Chunked token log-probs: equal to the naive log_softmax gather (values, entropy, gradients), and no
[B, T, vocab] intermediate in the compiled forward or backward. Also: remat policies change nothing."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax.models import qwen

CFG = qwen.ModelConfig(family="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8)


def naive_logprobs(cfg, params, tokens, mask, temperature=1.0):
    """Reference: full [B, T, V] logits, log_softmax, gather; entropy of the same distribution."""
    logits = qwen.forward(cfg, params, tokens, mask)[:, :-1] / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    pad0 = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    return pad0(picked), pad0(ent)


@pytest.fixture(scope="module")
def setup(random_params_fn):
    # Everything below is jitted.
    rng = np.random.RandomState(0)
    params = random_params_fn(CFG, rng)
    tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, 11)), jnp.int32)
    mask = np.ones((3, 11), bool)
    mask[1, :4] = False  # left padding
    mask[2, :9] = False
    return params, tokens, jnp.asarray(mask)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 4), (0.7, 4), (1.3, 64)])
def test_chunked_equals_naive(setup, temperature, chunk_size):
    params, tokens, mask = setup

    @jax.jit  # one compile for all three computations: compiles dominate this test's time
    def run(params, tokens, mask):
        kw = dict(temperature=temperature, chunk_size=chunk_size)
        return (qwen.token_logprobs(CFG, params, tokens, mask, return_entropy=True, **kw),
                qwen.token_logprobs(CFG, params, tokens, mask, **kw),
                naive_logprobs(CFG, params, tokens, mask, temperature))

    (lp, ent), only_lp, (ref_lp, ref_ent) = run(params, tokens, mask)
    assert lp.shape == ent.shape == tokens.shape and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5, rtol=0)
    assert np.all(np.asarray(lp)[:, 0] == 0) and np.asarray(lp)[:, 1:].min() < -1.0
    assert np.asarray(ent)[:, 1:].min() > 0.1
    np.testing.assert_allclose(np.asarray(only_lp), np.asarray(lp), atol=1e-6, rtol=0)


def _masked_loss(fn, mask):
    def loss(params):
        lp, ent = fn(params)
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(lp[:, 1:] * m) + 0.1 * jnp.sum(ent[:, 1:] * m)
    return loss


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def test_gradients_equal_naive(setup):
    params, tokens, mask = setup
    chunked = _masked_loss(lambda p: qwen.token_logprobs(CFG, p, tokens, mask, temperature=0.8, chunk_size=4,
                                                         return_entropy=True), mask)
    naive = _masked_loss(lambda p: naive_logprobs(CFG, p, tokens, mask, 0.8), mask)
    both = jax.jit(lambda p: (jax.value_and_grad(chunked)(p), jax.value_and_grad(naive)(p)))
    (v1, g1), (v2, g2) = both(params)
    assert abs(float(v1) - float(v2)) <= 1e-4 * abs(float(v2))
    assert _max_diff(g1, g2) <= 1e-5
    assert float(jnp.abs(g1["layers"]["q_proj"]).max()) > 1e-3  # gradients reach the decoder


_SHAPE = re.compile(r"\b(?:f32|bf16|f16|f64|s32|u32|pred|s8|u8)\[([0-9,]*)\]")


def largest_array(hlo: str) -> int:
    """Element count of the largest array shape in an HLO text dump."""
    sizes = [int(np.prod([int(d) for d in m.split(",") if d])) for m in _SHAPE.findall(hlo)]
    return max(sizes)


def test_no_full_vocab_intermediate_in_forward_or_backward():
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16)
    B, T, C = 2, 1024, 128
    full = B * (T - 1) * cfg.vocab_size  # what a [B, T-1, V] logits tensor would hold
    shapes = qwen.param_shapes(cfg)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    chunked = functools.partial(qwen.token_logprobs, cfg, chunk_size=C, temperature=0.9, return_entropy=True)

    def chunked_loss(params, tokens):
        lp, ent = chunked(params, tokens)
        return jnp.sum(lp) + jnp.sum(ent)

    def naive_loss(params, tokens):
        return jnp.sum(naive_logprobs(cfg, params, tokens, jnp.ones(tokens.shape, bool))[0])

    compiled = lambda f: jax.jit(f).lower(shapes, tokens).compile().as_text()
    fwd = largest_array(compiled(chunked))
    bwd = largest_array(compiled(jax.value_and_grad(chunked_loss)))
    # One chunk of logits [B, C, V] is allowed, never the whole sequence's.
    assert B * C * cfg.vocab_size <= max(fwd, bwd) < full // 4, (fwd, bwd, full)
    # The detector does see the full tensor when it exists.
    assert largest_array(compiled(naive_loss)) >= full


def test_remat_policies_agree(setup):
    params, tokens, mask = setup

    def loss(cfg, p):  # logits as aux: one graph gives both the forward and its gradient
        logits = qwen.forward(cfg, p, tokens, mask)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(logp * mask[:, 1:]), logits

    results = {policy: jax.jit(jax.grad(functools.partial(loss, CFG.replace(remat=policy)), has_aux=True))(params)
               for policy in ("none", "full", "save_dots")}
    ref_grads, ref_logits = results["none"]
    for policy in ("full", "save_dots"):
        grads, logits = results[policy]
        # Recomputation and fusion reorder float ops: equal to float32 rounding, relative to each
        # gradient's scale (summed-loss gradients reach ~12 here).
        assert float(jnp.abs(logits - ref_logits).max()) <= 1e-5
        rel = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), grads, ref_grads)
        assert max(jax.tree.leaves(rel)) <= 1e-5, rel
    assert float(jnp.abs(ref_grads["layers"]["down_proj"]).max()) > 1e-2


@pytest.mark.parametrize("unroll", [2, 5])
def test_scan_unroll_changes_nothing(setup, unroll):
    """ModelConfig.scan_unroll (2 = num_layers, 5 > num_layers: fully unrolled) gives the scanned model's
    log-probs and gradients."""
    params, tokens, mask = setup
    unrolled = CFG.replace(scan_unroll=unroll)

    def loss(cfg, p):
        return jnp.sum(qwen.token_logprobs(cfg, p, tokens, mask, chunk_size=4) * mask)

    base = jax.jit(jax.value_and_grad(functools.partial(loss, CFG)))(params)
    other = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled)))(params)
    np.testing.assert_allclose(other[0], base[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(base[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))
    # and the unrolled program really has lost its layer loop (the log-prob chunk scan stays)
    loops = lambda cfg: jax.jit(functools.partial(loss, cfg)).lower(params).as_text().count("stablehlo.while")
    assert loops(unrolled) == loops(CFG) - 1


def test_scan_unroll_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="scan_unroll"):
        CFG.replace(scan_unroll=0)
