"""Per-layer KV cache for a fixed number of decode slots, and attention of one new token over it.

Layout (S = slots, KV = kv heads, hd = head_dim, C = cache length, the current length bucket):

    k[l]  [S, KV, hd, C]   keys stored transposed, so q . K is a plain [G, hd] x [hd, C] matmul
    v[l]  [S, KV, C, hd]

One array per layer (a tuple, not a stacked [L, ...] array): the decode step is unrolled over layers
and each layer updates its own buffer in place; slicing a stacked cache per layer makes XLA copy the
slice every step. The cache length C is a bucket that the host grows or shrinks between decode chunks
(`resize`), so attention reads exactly the bucket, never a padded maximum. Slot s holds its sequence
at cache positions 0 .. lengths[s]-1 (no left padding), so a position is also its RoPE position.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.parallel.rules import SAMPLING_RULES, constrain

K_AXES = ("batch", "act_kv_heads", None, "cache_seq")
V_AXES = ("batch", "act_kv_heads", "cache_seq", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k: tuple of L arrays [S, KV, hd, C]; v: tuple of L arrays [S, KV, C, hd] (see module doc)."""

    k: tuple
    v: tuple

    @property
    def length(self) -> int:
        return self.v[0].shape[2]

    @property
    def num_slots(self) -> int:
        return self.v[0].shape[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_cache(cfg: ModelConfig, num_slots: int, length: int, dtype) -> KVCache:
    """Zero cache of `length` positions for `num_slots` slots. Under a mesh (`jax.set_mesh`) it is created
    sharded by the sampling rules (slots over data x fsdp, kv heads over tensor)."""
    L, KV, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    k = lambda: constrain(jnp.zeros((num_slots, KV, hd, length), dtype), K_AXES, SAMPLING_RULES)
    v = lambda: constrain(jnp.zeros((num_slots, KV, length, hd), dtype), V_AXES, SAMPLING_RULES)
    return KVCache(k=tuple(k() for _ in range(L)), v=tuple(v() for _ in range(L)))


@functools.partial(jax.jit, static_argnames=("length",))
def resize(cache: KVCache, length: int) -> KVCache:
    """The same cache with `length` positions: zero-padded when growing, truncated when shrinking (the
    host only shrinks to a length that still holds every active slot's entries)."""
    def fit(x, axis):
        cur = x.shape[axis]
        if length >= cur:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, length - cur)
            return jnp.pad(x, pad)
        return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    k = tuple(constrain(fit(x, 3), K_AXES, SAMPLING_RULES) for x in cache.k)
    v = tuple(constrain(fit(x, 2), V_AXES, SAMPLING_RULES) for x in cache.v)
    return KVCache(k=k, v=v)


def write_prompt(k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array):
    """Writes a prefilled batch into cache rows. k / v [n, P, KV, hd] land at positions 0..P-1 of rows
    `slots` [n]; a slot index >= S (a padding row of the prefill batch) is dropped."""
    P = k.shape[1]
    kt = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)   # [n, KV, hd, P]
    vt = jnp.transpose(v, (0, 2, 1, 3)).astype(v_cache.dtype)   # [n, KV, P, hd]
    k_cache = k_cache.at[slots, :, :, :P].set(kt, mode="drop")
    v_cache = v_cache.at[slots, :, :P].set(vt, mode="drop")
    return constrain(k_cache, K_AXES, SAMPLING_RULES), constrain(v_cache, V_AXES, SAMPLING_RULES)


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(cache: KVCache, kv: tuple, slots: jax.Array) -> KVCache:
    """Writes prefilled prompts into cache rows: kv is a tuple over layers of (k, v) [n, P, KV, hd]
    (from `engine.prefill`), landing at positions 0..P-1 of rows `slots` [n] (index >= S: dropped)."""
    ks, vs = zip(*(write_prompt(kc, vc, slots, k, v) for kc, vc, (k, v) in zip(cache.k, cache.v, kv)))
    return KVCache(k=tuple(ks), v=tuple(vs))


def write_token(k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array):
    """Writes one new token per slot: k / v [S, KV, hd] at cache position positions[s] of slot s (an
    index >= C is dropped: that is how finished slots skip the write)."""
    rows = jnp.arange(k.shape[0])
    k_cache = k_cache.at[rows, :, :, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
    return constrain(k_cache, K_AXES, SAMPLING_RULES), constrain(v_cache, V_AXES, SAMPLING_RULES)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array) -> jax.Array:
    """Grouped-query attention of one query per slot over its own cache entries.

    q [S, H, hd] (RoPE applied); k_cache [S, KV, hd, C]; v_cache [S, KV, C, hd]; lengths [S]: slot s sees
    positions < lengths[s] (which must include the token just written). Scores and softmax in float32.
    Returns [S, H, hd] in q's dtype.
    """
    S, H, hd = q.shape
    KV, C = k_cache.shape[1], k_cache.shape[3]
    qg = q.reshape(S, KV, H // KV, hd)
    scores = jnp.einsum("skgd,skdc->skgc", qg, k_cache.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    valid = jnp.arange(C)[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("skgc,skcd->skgd", probs.astype(q.dtype), v_cache.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(S, H, hd).astype(q.dtype)
