"""Next-token sampling: greedy, temperature, top-k, top-p, with float32 log-probs of the chosen tokens.

Everything here is O(V) per row and sort-free, because a full sort of the vocabulary per decode step
costs more than the model on CPU (XLA's CPU sort of [64, 1024] takes ~20 ms) and is wasteful on GPU:

* sampling uses the inverse CDF with one uniform number per row (drawn from a per-(request, token)
  key, so the result does not depend on which slot or batch a request ran in), not Gumbel noise over
  the whole vocabulary; the CDF is built hierarchically (block sums, then one block) with small
  triangular matmuls instead of `cumsum`, whose XLA lowering is a slow reduce-window on CPU;
* top-k and top-p thresholds are found by bisection over float bit patterns (32 masked reductions),
  which is exact: the kept sets are {z >= k-th largest z} (ties kept, as `transformers`) and
  {p : mass of strictly more likely tokens < top_p}.

Log-probs are those of the full (unfiltered) distribution softmax(logits / temperature), the one the
trainer recomputes (as verl does); for greedy decoding (temperature 0) they are under the raw logits.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static (compile-time) part of the sampling settings; temperature and top_p values are traced
    so changing them does not recompile."""

    greedy: bool = False
    top_k: int = 0          # 0 = off
    top_p: bool = False     # whether the nucleus filter runs (top_p < 1)


def make_mode(temperature: float, top_p: float, top_k: int, vocab_size: int) -> SamplingMode:
    """Validates user settings and returns the static mode (greedy iff temperature == 0)."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if temperature == 0.0:
        return SamplingMode(greedy=True)
    k = 0 if top_k >= vocab_size else int(top_k)
    return SamplingMode(greedy=False, top_k=k, top_p=top_p < 1.0)


def token_uniforms(rng: jax.Array, requests: jax.Array, steps: jax.Array) -> jax.Array:
    """float32 [B] uniforms in (0, 1], one per (request index, token index): the draw for token t of
    request r is the same whichever slot, batch or refill schedule it ran in."""
    def one(r, t):
        key = jax.random.fold_in(jax.random.fold_in(rng, r), t)
        return 1.0 - jax.random.uniform(key, (), jnp.float32)
    return jax.vmap(one)(requests, steps)


def _sortable(x: jax.Array) -> jax.Array:
    """int32 keys with the same order as the float32 values (an involution on the bit patterns)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
    # floor((lo + hi) / 2) without int32 overflow.
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def kth_largest_mask(z: jax.Array, k: int) -> jax.Array:
    """bool [B, V]: z >= the k-th largest value of its row (ties at the threshold are all kept)."""
    keys = _sortable(z)
    lo = jnp.min(keys, axis=-1)                      # count(keys >= lo) = V >= k
    hi = jnp.max(keys, axis=-1) + 1                  # count(keys >= hi) = 0 < k (max < int32 max: finite)

    def body(_, lohi):
        lo, hi = lohi
        mid = _midpoint(lo, hi)
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return keys >= lo[:, None]


def top_p_mask(w: jax.Array, top_p: jax.Array) -> jax.Array:
    """bool [B, V] for non-negative weights w: keep token i iff the normalised mass of tokens strictly
    more likely than i is < top_p (the smallest nucleus; the most likely token is always kept)."""
    p = w / jnp.sum(w, axis=-1, keepdims=True)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)  # p >= 0, so bit patterns are ordered like p
    lo = jnp.full(p.shape[:-1], -1, jnp.int32)         # mass above -1 is everything: predicate false
    hi = jnp.max(bits, axis=-1)                        # mass above the max is 0 < top_p: predicate true

    def body(_, lohi):
        lo, hi = lohi
        mid = _midpoint(lo, hi)
        above = jnp.sum(jnp.where(bits > mid[:, None], p, 0.0), axis=-1)
        ok = above < top_p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return bits >= hi[:, None]


def _tri(n: int) -> jax.Array:
    """[n, n] upper-triangular ones: x @ tri is the inclusive prefix sum of x."""
    return jnp.triu(jnp.ones((n, n), jnp.float32))


def argmax_first(x: jax.Array) -> jax.Array:
    """int32 index of the row maximum, the first one on ties (as torch / jnp.argmax). Two plain
    reductions: XLA's variadic argmax reduce is several times slower on CPU."""
    n = x.shape[-1]
    ar = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), ar, n), axis=-1)
    return jnp.minimum(first, n - 1)


def _snap_to_positive(w: jax.Array, idx: jax.Array) -> jax.Array:
    """The last index <= idx with w > 0 (else the first with w > 0): rounding in a prefix sum can never
    select a zero-weight (filtered) entry."""
    n = w.shape[-1]
    ar = jnp.arange(n, dtype=jnp.int32)
    pos = w > 0
    before = jnp.max(jnp.where(pos & (ar <= idx[:, None]), ar, -1), axis=-1)
    first = jnp.minimum(jnp.min(jnp.where(pos, ar, n), axis=-1), n - 1)
    return jnp.where(before >= 0, before, first).astype(jnp.int32)


def inverse_cdf_sample(w: jax.Array, u: jax.Array) -> jax.Array:
    """int32 [B] index drawn with probability w / sum(w) for weights w [B, N] >= 0 (some > 0) and
    uniforms u [B] in (0, 1]. Two-level: choose a block of ~sqrt(N) entries by its mass, then an entry
    inside it; both prefix sums are small float32 matmuls at full precision."""
    B, N = w.shape
    bs = max(8, 1 << math.ceil(math.log2(max(1, math.isqrt(N)))))
    nb = -(-N // bs)
    w3 = jnp.pad(w, ((0, 0), (0, nb * bs - N))).reshape(B, nb, bs)
    mass = jnp.sum(w3, axis=-1)                                            # [B, nb]
    cdf = jnp.matmul(mass, _tri(nb), precision=_HIGHEST)                  # inclusive
    x = u * cdf[:, -1]
    blk = jnp.minimum(jnp.sum(cdf < x[:, None], axis=-1), nb - 1)
    blk = _snap_to_positive(mass, blk)
    below = jnp.where(blk > 0, jnp.take_along_axis(cdf, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w3, blk[:, None, None], axis=1)[:, 0]     # [B, bs]
    icdf = jnp.matmul(inner, _tri(bs), precision=_HIGHEST)
    # Rescale the residual to the block's own prefix-sum total so rounding cannot step past its end.
    blk_mass = jnp.take_along_axis(mass, blk[:, None], -1)[:, 0]
    frac = jnp.clip((x - below) / jnp.where(blk_mass > 0, blk_mass, 1.0), 0.0, 1.0)
    xi = jnp.maximum(frac * icdf[:, -1], jnp.finfo(jnp.float32).tiny)
    j = jnp.minimum(jnp.sum(icdf < xi[:, None], axis=-1), bs - 1)
    j = _snap_to_positive(inner, j)
    return blk * bs + j


def sample(logits: jax.Array, u: jax.Array | None, temperature: jax.Array, top_p: jax.Array,
           mode: SamplingMode) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row. logits f32 [B, V]; u f32 [B] uniforms in (0, 1] (unused when greedy).

    Returns (tokens int32 [B], logprobs f32 [B]) where logprobs = log softmax(logits / temperature) at
    the token, under the full distribution (top-k / top-p only restrict which tokens can be drawn);
    greedy returns argmax (first index on ties, as torch) and log softmax(logits) at it.
    """
    logits = logits.astype(jnp.float32)
    if mode.greedy:
        tok = argmax_first(logits)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return tok, jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - lse
    z = logits / temperature
    zmax = jnp.max(z, axis=-1, keepdims=True)
    w = jnp.exp(z - zmax)
    lse = jnp.log(jnp.sum(w, axis=-1)) + zmax[:, 0]
    if mode.top_k:
        w = jnp.where(kth_largest_mask(z, mode.top_k), w, 0.0)
    if mode.top_p:
        w = jnp.where(top_p_mask(w, top_p), w, 0.0)
    tok = inverse_cdf_sample(w, u)
    return tok, jnp.take_along_axis(z, tok[:, None], -1)[:, 0] - lse
