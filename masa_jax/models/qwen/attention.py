"""Attention for `model.decoder_layer`: the `Attend` closures, and the XLA / Pallas implementations.

The decoder layer is written once; what differs between the training forward, the sampler's prefill
and its decode step is only how a layer attends. Each passes the layer an `Attend` closure:

    attend(q [B, T, H, hd], k [B, T, KV, hd], v [B, T, KV, hd]) -> (out [B, T, H, hd], aux)

q / k / v are the layer's own projections (RoPE applied); `aux` is whatever the caller needs back
from each layer: nothing in training, the prompt's keys / values in prefill, the layer's updated cache
in decode (`sampling.kv_cache.token_attention`). Closures are built once, outside the layer loop (and
outside `lax.scan` / `jax.checkpoint`), so masks and segment ids are computed once per forward.

Implementations, chosen by `ModelConfig.attention_impl`:

* "xla" / "cudnn": `jax.nn.dot_product_attention` with a dense [B, T, T] mask ("xla": in causal query
  blocks, `causal_attention`); decode reads the dense cache with two einsums (`kv_cache.decode_attention`).
* "pallas": JAX's Pallas TPU kernels. Training and prefill use splash attention (causal mask + segment
  ids for the padding, GQA native, fully-masked blocks skipped); decode uses the paged-attention decode
  kernel over the cache viewed as pages (ragged per-slot lengths). On a backend other than TPU it falls
  back to XLA with a one-time warning, unless `ModelConfig.pallas_interpret` runs the kernels in
  Pallas interpret mode (for tests on CPU; slow). Under a mesh the kernels run per shard (`shard_map`):
  a Pallas call has no SPMD partitioning rule.

Not used: `ragged_paged_attention` (mixed prefill + decode, K / V interleaved in one cache) fails in
TPU interpret mode in jax 0.10.2 (its kernel reshapes a VMEM ref, which the interpreter does not
support: "'ReshapeTransform' object has no attribute 'indices'"), so it cannot be tested on CPU; the
older `flash_attention` kernel has no GQA (K / V would be repeated per query head) and no interpret flag.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.parallel.rules import TRAIN_RULES, Rules, constrain, logical_to_spec

Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]

log = logging.getLogger(__name__)
_warned: set = set()


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def target_platform(cfg: ModelConfig) -> str:
    """The platform the programs are compiled for: `cfg.target_platform`, else the default backend."""
    return cfg.target_platform or jax.default_backend()


def use_pallas(cfg: ModelConfig) -> bool:
    """Whether this config runs the Pallas kernels: attention_impl "pallas" when compiling for TPU
    (`target_platform`: a TPU backend, or a TPU topology compiled from a CPU host), or on any backend in
    interpret mode. "pallas" elsewhere falls back to XLA (warned once)."""
    if cfg.attention_impl != "pallas":
        return False
    platform = target_platform(cfg)
    if cfg.pallas_interpret or platform == "tpu":
        return True
    warn_once(f"attention_impl='pallas' needs a TPU (target platform is {platform!r}): "
               "using XLA attention instead")
    return False


# ---------------------------------------------------------------------------------------------- XLA


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """bool [B, T, T]: query t sees real keys s <= t. A padding query sees itself only, which keeps its
    softmax finite without affecting real tokens."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    valid = attention_mask.astype(bool)
    return (causal[None] & valid[:, None, :]) | jnp.eye(T, dtype=bool)[None]


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention through `jax.nn.dot_product_attention` (XLA, or cuDNN when asked).
    q [B, T, H, hd]; k, v [B, S, KV, hd]; mask bool [B, T, S]."""
    impl = "cudnn" if cfg.attention_impl == "cudnn" else None
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=cfg.head_dim ** -0.5,
                                       implementation=impl)
    return constrain(out, ("batch", "seq", "act_heads", None))


# Query blocks of the XLA causal attention: at most this many, of at least MIN_QUERY_BLOCK tokens each.
MAX_QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 64


def query_blocks(T: int) -> int:
    """How many equal query blocks `causal_attention` cuts T queries into (1: not cut)."""
    for n in range(MAX_QUERY_BLOCKS, 1, -1):
        if T % n == 0 and T // n >= MIN_QUERY_BLOCK:
            return n
    return 1


def causal_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     key_offset: int = 0) -> jax.Array:
    """`attention` under a mask that is causal with an offset: query t sees no key at or after
    key_offset + t + 1 (mask [B, T, key_offset + T], False there). Cut into query blocks
    (`query_blocks`), each attending only to the keys before its own end, which skips the scores the
    mask zeroes (n blocks compute (n + 1) / 2n of them) and keeps each block's scores in cache. Equal
    to `attention` over the whole mask: the skipped keys get exactly zero weight there."""
    T = q.shape[1]
    n = query_blocks(T) if cfg.attention_impl == "xla" else 1
    if n == 1:
        return attention(cfg, q, k, v, mask)
    C = T // n
    ends = [key_offset + (j + 1) * C for j in range(n)]
    outs = [attention(cfg, qj, k[:, :end], v[:, :end], mj[:, :, :end])
            for qj, mj, end in zip(jnp.split(q, n, axis=1), jnp.split(mask, n, axis=1), ends)]
    return constrain(jnp.concatenate(outs, axis=1), ("batch", "seq", "act_heads", None))


def sequence_attention(cfg: ModelConfig, valid: jax.Array) -> Attend:
    """Causal self-attention over whole padded sequences (the training forward and prefill).
    valid bool [B, T]: real tokens (left padding in training, right padding in prefill)."""
    if use_pallas(cfg):
        return _splash_sequence_attention(cfg, valid)
    mask = causal_mask(valid)

    def attend(q, k, v):
        return causal_attention(cfg, q, k, v, mask), None

    return attend


def shared_prefix_attention(cfg: ModelConfig, prefix_valid: jax.Array, valid: jax.Array,
                            prefix_index: jax.Array) -> Attend:
    """Attention of the shared-prefix forward (`model.shared_prefix_hidden_states`): each layer sees one
    stream per block, the block's u prefixes of P tokens then its n suffixes of S tokens, flattened
    ([Bk, u * P + n * S, ...]). A prefix attends causally to itself; a suffix attends to all real tokens of
    its own prefix (`prefix_index` [Bk, n] into the block's u) and causally to itself, so each suffix
    token sees exactly what it sees in the unshared row prompt ++ response.

    prefix_valid bool [Bk, u, P] (real prompt tokens, right-padded), valid bool [Bk, n, S] (real response
    tokens). The prefix's K / V reach the suffixes by a gather with a batch dimension (block), which the
    SPMD partitioner keeps on the block's device; its transpose sums each suffix's key / value gradients
    back into the shared prefix, so gradients are those of the unshared rows.
    """
    Bk, u, P = prefix_valid.shape
    n, S = valid.shape[1:]
    gather = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))      # per block: [u, ...] at [n] -> [n, ...]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])              # [Bk, m, L, ...] -> [Bk * m, L, ...]
    own_prefix_valid = flat(gather(prefix_valid, prefix_index))  # [Bk * n, P]
    if use_pallas(cfg):
        return _splash_shared_prefix_attention(cfg, prefix_valid, valid, own_prefix_valid, prefix_index)
    prefix_mask = causal_mask(flat(prefix_valid))                                   # [Bk * u, P, P]
    suffix_mask = jnp.concatenate([jnp.broadcast_to(own_prefix_valid[:, None, :], (Bk * n, S, P)),
                                   causal_mask(flat(valid))], axis=-1)              # [Bk * n, S, P + S]

    def attend(q, k, v):
        (qp, qs), (kp, ks), (vp, vs) = (split_streams(x, u, P, n, S) for x in (q, k, v))
        out_p = causal_attention(cfg, flat(qp), flat(kp), flat(vp), prefix_mask)
        keys = jnp.concatenate([flat(gather(kp, prefix_index)), flat(ks)], axis=1)
        values = jnp.concatenate([flat(gather(vp, prefix_index)), flat(vs)], axis=1)
        out_s = causal_attention(cfg, flat(qs), keys, values, suffix_mask, key_offset=P)
        return join_streams(out_p.reshape(qp.shape), out_s.reshape(qs.shape)), None

    return attend


def split_streams(x: jax.Array, u: int, P: int, n: int, S: int) -> tuple[jax.Array, jax.Array]:
    """[Bk, u * P + n * S, ...] -> prefixes [Bk, u, P, ...], suffixes [Bk, n, S, ...]."""
    Bk, rest = x.shape[0], x.shape[2:]
    return x[:, :u * P].reshape((Bk, u, P) + rest), x[:, u * P:].reshape((Bk, n, S) + rest)


def join_streams(prefixes: jax.Array, suffixes: jax.Array) -> jax.Array:
    """Inverse of `split_streams`."""
    Bk = prefixes.shape[0]
    return jnp.concatenate([prefixes.reshape((Bk, -1) + prefixes.shape[3:]),
                            suffixes.reshape((Bk, -1) + suffixes.shape[3:])], axis=1)


# ------------------------------------------------------------------------------------ per-shard runs


def _run_per_shard(fn, args, logical_axes, rules: Rules):
    """fn(*args) on each device's shards under the current mesh (`jax.set_mesh`), else directly. The
    output is sharded like the first argument (the queries).

    A Pallas kernel is an opaque custom call to the SPMD partitioner, which would gather its operands
    onto every device; batch and head shards are independent attentions, so `shard_map` runs the kernel
    on the local block. Query heads are only split when the kv heads are split the same way: with kv
    heads replicated (e.g. 2 kv heads on a tensor axis of 4) the local GQA grouping would be wrong, so
    every tensor shard then computes all heads (correct, redundant; small kv-head counts only).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    specs = [logical_to_spec(ax, rules, mesh, a.shape) for a, ax in zip(args, logical_axes)]
    head_q, head_kv = "act_heads", "act_kv_heads"
    kv_heads_spec = next((s[ax.index(head_kv)] for s, ax in zip(specs, logical_axes) if head_kv in ax), None)

    def fix(spec, axes):  # query heads split exactly like the kv heads
        if head_q not in axes:
            return spec
        parts = list(spec) + [None] * (len(axes) - len(spec))
        parts[axes.index(head_q)] = kv_heads_spec
        return jax.sharding.PartitionSpec(*parts)

    specs = [fix(s, ax) for s, ax in zip(specs, logical_axes)]
    return jax.shard_map(fn, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*args)


def _interpret_ctx(cfg: ModelConfig):
    """TPU interpret mode for Pallas kernels without an `interpret` argument, scoped to this trace."""
    if not cfg.pallas_interpret:
        return contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.force_tpu_interpret_mode()


# ------------------------------------------------------------------------- Pallas: training / prefill

# Splash blocks must be multiples of 128 (the TPU lane width: the kernel rejects anything else, in
# interpret mode too). The sequence is padded to a multiple of 128 and the largest of these blocks
# that divides it is used: 512 is the kernel's sweet spot on v4 / v5 for head_dim 128.
SPLASH_BLOCKS = (512, 256, 128)


def splash_block(T: int) -> tuple[int, int]:
    """(padded length, block size) for a sequence of T tokens."""
    Tp = -(-T // 128) * 128
    return Tp, next(b for b in SPLASH_BLOCKS if Tp % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, T: int, block: int, interpret: bool):
    """The splash kernel for a causal mask over T (padded) tokens and num_heads query heads. Cached:
    building it preprocesses the block mask in numpy at trace time."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(num_heads)])
    b = block
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Called while tracing: the kernel's mask tables must be concrete arrays, not tracers of the first
    # trace that built them (the kernel is cached and reused by later traces).
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def prebuild_splash_kernels(cfg: ModelConfig, lengths, head_counts) -> None:
    """Builds (and caches) the splash kernels for sequences of `lengths` tokens and `head_counts` query
    heads per shard outside any trace. Needed when compiling for TPU devices of a compile-only topology
    (masa_jax.compile_check): built inside the trace, the kernel's mask tables are computed eagerly on
    those devices, which cannot run anything."""
    for T in lengths:
        Tp, block = splash_block(T)
        for heads in head_counts:
            _splash_kernel(heads, Tp, block, cfg.pallas_interpret)


def splash_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
                     ) -> jax.Array:
    """Causal GQA with Pallas splash attention. q [B, T, H, hd]; k, v [B, T, KV, hd]; segment_ids int32
    [B, T]: a query sees keys s <= t with its own segment id. Returns [B, T, H, hd] in q's dtype.

    The kernel takes no softmax scale: q is scaled first (in float32, then back to q's dtype).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, hd = q.shape
    Tp, block = splash_block(T)
    # The pad has segment id 0 (padding): real queries never see it (it comes after them), and each
    # pad query sees at least itself, so no softmax row is empty.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
    q = (q.astype(jnp.float32) * hd ** -0.5).astype(q.dtype)
    # [B, T, N, hd] -> [B, N, T, hd]: the kernel's head-major layout.
    qt, kt, vt = (jnp.swapaxes(pad(x), 1, 2) for x in (q, k, v))
    seg = pad(segment_ids.astype(jnp.int32))

    def local(qt, kt, vt, seg):  # one device's batch / head shard
        kernel = _splash_kernel(qt.shape[1], Tp, block, cfg.pallas_interpret)
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1))
        return jax.vmap(one)(qt, kt, vt, seg)

    heads = lambda name: ("batch", name, "seq", None)
    out = _run_per_shard(local, (qt, kt, vt, seg), (heads("act_heads"), heads("act_kv_heads"),
                                                     heads("act_kv_heads"), ("batch", "seq")), TRAIN_RULES)
    return jnp.swapaxes(out, 1, 2)[:, :T].astype(q.dtype)


def _splash_sequence_attention(cfg: ModelConfig, valid: jax.Array) -> Attend:
    """`sequence_attention` with splash: real tokens are segment 1, padding segment 0."""
    segment_ids = valid.astype(jnp.int32)

    def attend(q, k, v):
        out = splash_attention(cfg, q, k, v, segment_ids)
        # A padding query attends over padding keys only: finite, but meaningless; zero it so that
        # nothing downstream (e.g. a gradient through a masked loss) can pick it up.
        out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
        return constrain(out, ("batch", "seq", "act_heads", None)), None

    return attend


@functools.lru_cache(maxsize=None)
def _splash_offset_kernel(num_heads: int, Tq: int, Tk: int, block: int, interpret: bool):
    """Splash kernel for Tq queries over Tk = offset + Tq keys, query s seeing keys <= offset + s (the
    suffix queries of the shared-prefix forward over [own prefix | own suffix])."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((Tq, Tk), offset=Tk - Tq) for _ in range(num_heads)])
    b = block
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _shared_prefix_kernel_shape(P: int, S: int) -> tuple[int, int, int]:
    """(padded prefix, padded response, block) of the suffix kernel for prefixes of P and responses of S."""
    Pp, Sp = -(-P // 128) * 128, -(-S // 128) * 128
    return Pp, Sp, splash_block(math.gcd(Pp, Sp))[1]


def prebuild_shared_prefix_kernels(cfg: ModelConfig, P: int, S: int, head_counts) -> None:
    """`prebuild_splash_kernels` for the responses' kernel of the shared-prefix forward."""
    Pp, Sp, block = _shared_prefix_kernel_shape(P, S)
    for heads in head_counts:
        _splash_offset_kernel(heads, Sp, Pp + Sp, block, cfg.pallas_interpret)


def _splash_shared_prefix_attention(cfg: ModelConfig, prefix_valid, valid, own_prefix_valid, prefix_index
                                    ) -> Attend:
    """`shared_prefix_attention` with splash: the prefixes as in `_splash_sequence_attention`; each
    suffix over [its prefix padded to a multiple of 128 | itself padded likewise] with a causal mask offset
    by the padded prefix, segment 1 on real tokens and 0 on padding (a padding query sees padding keys,
    itself among them, so no softmax row is empty; its output is zeroed)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    Bk, u, P = prefix_valid.shape
    n, S = valid.shape[1:]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    gather = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))
    prefix_attend = _splash_sequence_attention(cfg, flat(prefix_valid))
    Pp, Sp, block = _shared_prefix_kernel_shape(P, S)
    pad_to = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    q_seg = pad_to(flat(valid).astype(jnp.int32), Sp)
    kv_seg = jnp.concatenate([pad_to(own_prefix_valid.astype(jnp.int32), Pp), q_seg], axis=1)
    suffix_valid = flat(valid)

    def attend(q, k, v):
        (qp, qs), (kp, ks), (vp, vs) = (split_streams(x, u, P, n, S) for x in (q, k, v))
        out_p, _ = prefix_attend(flat(qp), flat(kp), flat(vp))
        hd = qs.shape[-1]
        qf = (pad_to(flat(qs), Sp).astype(jnp.float32) * hd ** -0.5).astype(qs.dtype)
        kf = jnp.concatenate([pad_to(flat(gather(kp, prefix_index)), Pp), pad_to(flat(ks), Sp)], axis=1)
        vf = jnp.concatenate([pad_to(flat(gather(vp, prefix_index)), Pp), pad_to(flat(vs), Sp)], axis=1)
        qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (qf, kf, vf))

        def local(qt, kt, vt, qseg, kseg):
            kernel = _splash_offset_kernel(qt.shape[1], Sp, Pp + Sp, block, cfg.pallas_interpret)
            one = lambda q1, k1, v1, s1, s2: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s2))
            return jax.vmap(one)(qt, kt, vt, qseg, kseg)

        heads = lambda name: ("batch", name, "seq", None)
        out = _run_per_shard(local, (qt, kt, vt, q_seg, kv_seg),
                             (heads("act_heads"), heads("act_kv_heads"), heads("act_kv_heads"), ("batch", "seq"),
                              ("batch", "seq")), TRAIN_RULES)
        out_s = jnp.swapaxes(out, 1, 2)[:, :S].astype(qs.dtype)
        out_s = jnp.where(suffix_valid[:, :, None, None], out_s, jnp.zeros((), out_s.dtype))
        return join_streams(out_p.reshape(qp.shape), out_s.reshape(qs.shape)), None

    return attend


# ------------------------------------------------------------------------------------ Pallas: decode


def _largest_divisor(n: int, options) -> int:
    return next((o for o in options if n % o == 0), 1)


def decode_paging(C: int) -> tuple[int, int]:
    """(page_size, pages_per_compute_block) for a cache of C positions per slot: each slot's C entries
    are C / page_size consecutive pages. The page size must divide C (the sampler's cache buckets are
    multiples of 32; 16 rows is a bfloat16 TPU tile); the kernel streams blocks of page_size x
    pages_per_compute_block keys (<= 512)."""
    page = _largest_divisor(C, (64, 32, 16, 8, 4, 2))
    if page < 16:
        warn_once(f"cache length {C} is not a multiple of 16: paged decode uses pages of {page} "
                  "(may not compile on TPU; use cache lengths that are multiples of 16)")
    pages = C // page
    per_block = _largest_divisor(pages, [n for n in range(max(1, 512 // page), 0, -1)])
    return page, per_block


def paged_decode_attention(cfg: ModelConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           lengths: jax.Array, rules: Rules = TRAIN_RULES) -> jax.Array:
    """One query per slot against its first `lengths` cache entries with the Pallas paged-attention
    decode kernel. q [S, H, hd]; k_cache, v_cache [KV, S, C, hd] (`kv_cache`'s paged layout); lengths
    int32 [S] (>= 1). Returns [S, H, hd] in q's dtype.

    The kernel reads K / V as bfloat16 (exact for the bfloat16 cache it is used with: see
    `kv_cache.uses_paged_layout`); scores, softmax and the output accumulate in float32.
    """
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    KV, S, C, hd = k_cache.shape
    page, per_block = decode_paging(C)
    out_dtype = q.dtype
    q = q.astype(jnp.float32) * hd ** -0.5     # the kernel takes no scale
    lengths = jnp.minimum(lengths, C).astype(jnp.int32)   # a finished slot may sit at C

    def local(q, kc, vc, lengths):  # one device's slot / head shard
        kv, s = kc.shape[0], kc.shape[1]
        pages = C // page
        # Slot j owns pages j * pages .. (j + 1) * pages - 1: the [KV, S, C, hd] cache *is* the page pool
        # [KV, S * pages, page, hd] (a free reshape), so nothing is copied to page it.
        kp, vp = (x.reshape(kv, s * pages, page, hd) for x in (kc, vc))
        table = jnp.arange(s * pages, dtype=jnp.int32).reshape(s, pages)
        with _interpret_ctx(cfg):
            return paged_attention(q, kp, vp, lengths, table, pages_per_compute_block=per_block)

    cache_axes = ("act_kv_heads", "batch", "cache_seq", None)
    out = _run_per_shard(local, (q, k_cache, v_cache, lengths),
                         (("batch", "act_heads", None), cache_axes, cache_axes, ("batch",)), rules)
    return out.astype(out_dtype)

