"""Per-layer KV cache for a fixed number of decode slots, and attention of one new token over it.

Dense layout (XLA decode attention; S = slots, KV = kv heads, hd = head_dim, C = cache length, the
current length bucket):

    k[l]  [S, KV, hd, C]   keys stored transposed, so q . K is a plain [G, hd] x [hd, C] matmul
    v[l]  [S, KV, C, hd]

Paged layout (the Pallas paged-attention decode kernel, `uses_paged_layout`):

    k[l], v[l]  [KV, S, C, hd]   kv-head major: reshaped for free into the kernel's page pool
                                 [KV, S * C / page, page, hd], slot s owning its C / page pages in order

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

from masa_jax.models.qwen.attention import paged_decode_attention, use_pallas, warn_once
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.parallel.rules import SAMPLING_RULES, constrain

K_AXES = ("batch", "act_kv_heads", None, "cache_seq")
V_AXES = ("batch", "act_kv_heads", "cache_seq", None)
PAGED_AXES = ("act_kv_heads", "batch", "cache_seq", None)


def uses_paged_layout(cfg: ModelConfig, dtype) -> bool:
    """Whether a cache of this dtype takes the paged layout of the Pallas decode kernel: attention_impl
    "pallas" (on TPU or in interpret mode) and a bfloat16 cache. The kernel reads K / V as bfloat16, so
    a float32 cache keeps the dense layout and XLA attention rather than being rounded (warned once)."""
    if not use_pallas(cfg):
        return False
    if jnp.dtype(dtype) != jnp.bfloat16:
        warn_once(f"attention_impl='pallas': the paged decode kernel reads a bfloat16 cache; a "
                   f"{jnp.dtype(dtype).name} cache uses XLA decode attention")
        return False
    return True


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: tuples of L arrays; dense layout k [S, KV, hd, C], v [S, KV, C, hd]; paged layout (`paged`,
    static) k, v [KV, S, C, hd] (see module doc)."""

    k: tuple
    v: tuple
    paged: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def length(self) -> int:
        return self.v[0].shape[2]

    @property
    def num_slots(self) -> int:
        return self.v[0].shape[1 if self.paged else 0]


def _constrain(paged: bool, k: jax.Array, v: jax.Array):
    """Sampling-layout sharding of one layer's (k, v) cache."""
    k_axes, v_axes = (PAGED_AXES, PAGED_AXES) if paged else (K_AXES, V_AXES)
    return constrain(k, k_axes, SAMPLING_RULES), constrain(v, v_axes, SAMPLING_RULES)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_cache(cfg: ModelConfig, num_slots: int, length: int, dtype) -> KVCache:
    """Zero cache of `length` positions for `num_slots` slots, in the layout `uses_paged_layout` picks.
    Under a mesh (`jax.set_mesh`) it is created sharded by the sampling rules (slots over data x fsdp,
    kv heads over tensor)."""
    L, KV, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    paged = uses_paged_layout(cfg, dtype)
    if paged:
        shapes = (KV, num_slots, length, hd), (KV, num_slots, length, hd)
    else:
        shapes = (num_slots, KV, hd, length), (num_slots, KV, length, hd)
    layers = [_constrain(paged, jnp.zeros(shapes[0], dtype), jnp.zeros(shapes[1], dtype)) for _ in range(L)]
    return KVCache(k=tuple(k for k, _ in layers), v=tuple(v for _, v in layers), paged=paged)


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
    k_axis = 2 if cache.paged else 3
    kv = [_constrain(cache.paged, fit(k, k_axis), fit(v, 2)) for k, v in zip(cache.k, cache.v)]
    return KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv), paged=cache.paged)


def write_prompt(k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array, *,
                 paged: bool = False):
    """Writes a prefilled batch into one layer's cache rows (dense or `paged` layout). k / v [n, P, KV, hd]
    land at positions 0..P-1 of rows `slots` [n]; a slot index >= S (a padding row of the prefill batch)
    is dropped."""
    P = k.shape[1]
    if paged:
        kt = jnp.transpose(k, (2, 0, 1, 3)).astype(k_cache.dtype)   # [KV, n, P, hd]
        vt = jnp.transpose(v, (2, 0, 1, 3)).astype(v_cache.dtype)
        k_cache = k_cache.at[:, slots, :P].set(kt, mode="drop")
        v_cache = v_cache.at[:, slots, :P].set(vt, mode="drop")
    else:
        kt = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)   # [n, KV, hd, P]
        vt = jnp.transpose(v, (0, 2, 1, 3)).astype(v_cache.dtype)   # [n, KV, P, hd]
        k_cache = k_cache.at[slots, :, :, :P].set(kt, mode="drop")
        v_cache = v_cache.at[slots, :, :P].set(vt, mode="drop")
    return _constrain(paged, k_cache, v_cache)


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(cache: KVCache, kv: tuple, slots: jax.Array) -> KVCache:
    """Writes prefilled prompts into cache rows: kv is a tuple over layers of (k, v) [n, P, KV, hd]
    (from `engine.prefill`), landing at positions 0..P-1 of rows `slots` [n] (index >= S: dropped)."""
    ks, vs = zip(*(write_prompt(kc, vc, slots, k, v, paged=cache.paged)
                   for kc, vc, (k, v) in zip(cache.k, cache.v, kv)))
    return KVCache(k=tuple(ks), v=tuple(vs), paged=cache.paged)


def write_token(k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array, *,
                paged: bool = False):
    """Writes one new token per slot into one layer's cache (dense or `paged` layout): k / v [S, KV, hd]
    at cache position positions[s] of slot s (an index >= C is dropped: that is how finished slots skip
    the write)."""
    rows = jnp.arange(k.shape[0])
    if paged:
        k_cache = k_cache.at[:, rows, positions].set(jnp.swapaxes(k, 0, 1).astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[:, rows, positions].set(jnp.swapaxes(v, 0, 1).astype(v_cache.dtype), mode="drop")
    else:
        k_cache = k_cache.at[rows, :, :, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
    return _constrain(paged, k_cache, v_cache)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array) -> jax.Array:
    """Grouped-query attention of one query per slot over its own cache entries (dense layout, XLA).

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


def token_attention(cfg: ModelConfig, cache: KVCache, layer: int, write_pos: jax.Array, lengths: jax.Array):
    """The `attend` of one layer in a decode step (see `models/qwen/attention.py`): writes the new
    token's k / v [S, 1, KV, hd] at `write_pos` [S] of layer `layer`'s cache (`write_token`), then
    attends q [S, 1, H, hd] over the first `lengths` [S] entries of each slot: the Pallas paged kernel
    for a paged cache, `decode_attention` otherwise. Hands back the layer's updated (k_cache, v_cache)."""
    def attend(q, k, v):
        kc, vc = write_token(cache.k[layer], cache.v[layer], write_pos, k[:, 0], v[:, 0], paged=cache.paged)
        if cache.paged:
            out = paged_decode_attention(cfg, q[:, 0], kc, vc, lengths, SAMPLING_RULES)
        else:
            out = decode_attention(q[:, 0], kc, vc, lengths)
        return out[:, None], (kc, vc)
    return attend
