"""The sampling functions alone: distribution (chi-square), top-k / top-p sets against a sort-based
numpy reference, the inverse-CDF sampler's edge cases, greedy and log-probs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from masa_jax.sampling import sampling_fns as sf

V = 16
DRAWS = 40000


def _draw(logits_row, temperature, top_p, mode, n=DRAWS, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
    u = sf.token_uniforms(jax.random.key(seed), jnp.arange(n), jnp.zeros(n, jnp.int32))
    fn = jax.jit(sf.sample, static_argnums=4)
    tok, lp = fn(logits, u, jnp.float32(temperature), jnp.float32(top_p), mode)
    return np.asarray(tok), np.asarray(lp)


def _chi2_pvalue(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token with probability 0"
    return stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * len(tokens)).pvalue


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _ref_sets(z, top_k, top_p):
    """Kept set by sorting, as transformers: top-k (ties at the k-th value kept), then the smallest prefix
    of the renormalised sorted distribution whose exclusive cumulative mass is < top_p."""
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1:
        p = np.where(keep, _softmax(np.where(keep, z, -np.inf)), 0.0)
        order = np.argsort(-p, kind="stable")
        excl = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[excl < top_p]] = True
        keep &= nucleus
    return keep


LOGITS = np.random.RandomState(0).randn(V).astype(np.float32) * 1.5


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_temperature_sampling_matches_softmax(temperature):
    tok, lp = _draw(LOGITS, temperature, 1.0, sf.SamplingMode())
    probs = _softmax(LOGITS.astype(np.float64) / temperature)
    assert _chi2_pvalue(tok, probs) > 1e-3
    np.testing.assert_allclose(lp, np.log(probs[tok]), atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.7), (6, 0.8)])
def test_top_k_top_p_stay_in_set_and_keep_proportions(top_k, top_p):
    mode = sf.SamplingMode(top_k=top_k, top_p=top_p < 1)
    tok, lp = _draw(LOGITS, 1.0, top_p, mode)
    keep = _ref_sets(LOGITS.astype(np.float64), top_k, top_p)
    assert keep[tok].all(), f"tokens outside the kept set: {sorted(set(tok[~keep[tok]]))}"
    probs = np.where(keep, _softmax(LOGITS.astype(np.float64)), 0.0)
    assert _chi2_pvalue(tok, probs) > 1e-3
    # log-probs are under the full (unfiltered) distribution, which the trainer recomputes
    np.testing.assert_allclose(lp, np.log(_softmax(LOGITS.astype(np.float64))[tok]), atol=1e-5)


def test_filter_masks_match_sort_reference():
    rs = np.random.RandomState(1)
    z = rs.randn(64, 200).astype(np.float32) * rs.uniform(0.1, 4, (64, 1)).astype(np.float32)
    z[0, :10] = z[0, 10]  # ties at the threshold
    for k in (1, 3, 50):
        got = np.asarray(jax.jit(sf.kth_largest_mask, static_argnums=1)(jnp.asarray(z), k))
        want = np.stack([_ref_sets(row.astype(np.float64), k, 1.0) for row in z])
        np.testing.assert_array_equal(got, want)
    for p in (0.05, 0.5, 0.95):
        w = np.exp(z - z.max(-1, keepdims=True))
        got = np.asarray(jax.jit(sf.top_p_mask)(jnp.asarray(w), jnp.float32(p)))
        want = np.stack([_ref_sets(row.astype(np.float64), 0, p) for row in z])
        # Only rows whose boundary is not within float32 rounding of top_p can be compared exactly.
        probs = w / w.sum(-1, keepdims=True)
        srt = -np.sort(-probs, -1)
        margin = np.min(np.abs(np.cumsum(srt, -1) - srt - p), -1)
        ok = margin > 1e-5
        assert ok.mean() > 0.9
        np.testing.assert_array_equal(got[ok], want[ok])
        assert got.any(-1).all()  # the most likely token is always kept


def test_inverse_cdf_edges_never_pick_zero_weight():
    rs = np.random.RandomState(2)
    w = rs.uniform(size=(512, 300)).astype(np.float32)
    w[rs.uniform(size=w.shape) < 0.9] = 0.0
    w[:, 0] = 0.0
    w[:, -1] = 0.0
    w[np.arange(512), rs.randint(1, 299, 512)] = 1e-30  # at least one positive, some tiny
    u = np.concatenate([np.ones(128), np.full(128, np.finfo(np.float32).tiny), rs.uniform(size=256)])
    idx = np.asarray(jax.jit(sf.inverse_cdf_sample)(jnp.asarray(w), jnp.asarray(u, jnp.float32)))
    assert (w[np.arange(512), idx] > 0).all()


def test_greedy_and_mode_validation():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    tok, lp = sf.sample(logits, None, jnp.float32(1.0), jnp.float32(1.0), sf.make_mode(0.0, 1.0, 0, V))
    np.testing.assert_array_equal(np.asarray(tok), [LOGITS.argmax(), V - 1 - LOGITS.argmax()])
    np.testing.assert_allclose(np.asarray(lp), np.log(_softmax(LOGITS.astype(np.float64)).max()), atol=1e-6)
    assert sf.make_mode(1.0, 1.0, 100, V) == sf.SamplingMode()  # top_k >= V is no filter
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)]:
        kw = dict(temperature=1.0, top_p=1.0, top_k=0, vocab_size=V) | bad
        with pytest.raises(ValueError):
            sf.make_mode(**kw)
