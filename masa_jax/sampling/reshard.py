"""Training params -> sampling params: the sampler's own layout, dtype and sharding.

Training keeps params stacked over layers ([L, ...] leaves, scanned) in float32, FSDP-sharded along
`embed` and tensor-parallel (TRAIN_RULES). The sampler wants:

* the compute dtype (bfloat16 on accelerators): a decode step is bound by reading the weights;
* tensor-parallel weights replicated over data / fsdp (SAMPLING_RULES), so a decode step all-gathers
  no parameters, only does the tensor-parallel reductions;
* one dict per layer (`params["layers"]` a tuple) instead of stacked leaves, because the decode step
  is unrolled over layers and XLA copies a per-layer slice of a stacked weight at every step.

A LoRA policy (`lora.attach`: the base with adapters under params["layers"]["lora"]) is merged
(W + A @ scale B) in the same program, so the sampler reads plain weights and a decode step costs
what the base model's does; `merge_lora=False` keeps the low-rank path per layer instead (measured
against the merged one in docs/benchmarks.md).

`to_sampling_params` does all three in one jitted program whose out_shardings drive the collectives;
`measure_reshard` times it and reports the bytes involved.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from masa_jax.models.qwen import lora as lora_lib, quantize
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.model import param_logical_axes, param_shapes
from masa_jax.parallel.rules import SAMPLING_RULES, logical_to_spec


def is_sampling_params(params) -> bool:
    """True for the per-layer layout `to_sampling_params` returns."""
    return isinstance(params.get("layers"), (tuple, list))


def sampling_shapes(cfg: ModelConfig, dtype, quantized: str = "") -> dict:
    """ShapeDtypeStructs of the sampling params: stacked shapes with the layer axis split off (with
    `quantized`, a QLoRA base's type: its projection weights as the quantized base holds them)."""
    stacked = quantize.quantized_shapes(cfg, quantized) if quantized else param_shapes(cfg)
    one = {k: (jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), s) if _is_q(s)
               else jax.ShapeDtypeStruct(s.shape[1:], dtype)) for k, s in stacked["layers"].items()}
    out = {k: jax.ShapeDtypeStruct(s.shape, dtype) for k, s in stacked.items() if k != "layers"}
    out["layers"] = tuple(dict(one) for _ in range(cfg.num_layers))
    return out


def sampling_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype=jnp.bfloat16,
                       unmerged_lora: lora_lib.LoraConfig | None = None, quantized: str = "") -> dict:
    """NamedShardings of the sampling params under SAMPLING_RULES (with `unmerged_lora`: plus each
    layer's attached adapters; with `quantized`: a QArray's qvalue and scales laid out like its weight)."""
    axes = param_logical_axes(cfg)
    shapes = sampling_shapes(cfg, dtype, quantized)
    ns = lambda ax, s: jax.sharding.NamedSharding(mesh, logical_to_spec(ax, SAMPLING_RULES, mesh, s.shape))
    out = {k: ns(axes[k], shapes[k]) for k in shapes if k != "layers"}
    layer = {k: jax.tree.map(functools.partial(ns, axes["layers"][k][1:]), s)
             for k, s in shapes["layers"][0].items()}
    if unmerged_lora is not None:
        lora_axes = lora_lib.adapter_logical_axes(cfg, unmerged_lora)["layers"]
        lora_shapes = lora_lib.adapter_shapes(cfg, unmerged_lora)["layers"]
        layer[lora_lib.ATTACHED_KEY] = {
            name: {f: ns(lora_axes[name][f][1:], jax.ShapeDtypeStruct(lora_shapes[name][f].shape[1:], dtype))
                   for f in ("a", "b")} for name in lora_axes}
    out["layers"] = tuple(dict(layer) for _ in range(cfg.num_layers))
    return out


def _is_q(x) -> bool:
    return isinstance(x, qwix.QArray)


def _cast(x, dtype):
    """Casts a dense weight; a quantized one stays as it is (the decoder dequantizes it per layer)."""
    return x if _is_q(x) or x.dtype == dtype else x.astype(dtype)


def _attached_lora(params: dict) -> lora_lib.LoraConfig | None:
    """The targets and rank of the adapters attached to stacked or per-layer params (alpha is already
    in B), None without adapters."""
    layer = params["layers"][0] if is_sampling_params(params) else params["layers"]
    attached = layer.get(lora_lib.ATTACHED_KEY)
    if not attached:
        return None
    rank = next(iter(attached.values()))["a"].shape[-1]
    return lora_lib.LoraConfig(rank=rank, alpha=float(rank), targets=tuple(attached))


@functools.lru_cache(maxsize=None)
def _converter(cfg: ModelConfig, dtype_name: str, mesh: jax.sharding.Mesh | None,
               unmerged_lora: lora_lib.LoraConfig | None, quantized: str = ""):
    dtype = jnp.dtype(dtype_name)

    def convert(params):
        if unmerged_lora is None:
            params = lora_lib.merge_attached(params)  # W + A @ (scale B) in float32, before the cast
        out = {k: _cast(v, dtype) for k, v in params.items() if k != "layers"}
        out["layers"] = tuple({k: (jax.tree.map(lambda x: x[i], v) if _is_q(v) else
                                   jax.tree.map(lambda x: _cast(x[i], dtype), v))
                               for k, v in params["layers"].items()} for i in range(cfg.num_layers))
        return out

    shardings = sampling_shardings(cfg, mesh, dtype, unmerged_lora, quantized) if mesh is not None else None
    return jax.jit(convert, out_shardings=shardings)


def to_sampling_params(cfg: ModelConfig, params: dict, *, mesh: jax.sharding.Mesh | None = None,
                       dtype=None, merge_lora: bool | None = None) -> dict:
    """Stacked (training) params -> sampling params: per-layer dicts in `dtype` (default: the compute
    dtype `cfg.dtype`), laid out by SAMPLING_RULES on `mesh` when one is given. Params already in the
    sampling layout are only cast / resharded. The result is a new copy; the input is untouched.
    Attached LoRA adapters are merged into their weights (the default), or with `merge_lora=False` kept
    (cast) per layer for the decoder's low-rank path. A quantized (QLoRA) base is never merged: it stays
    quantized and the adapters unmerged, since a merged weight would be dense again."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    attached = _attached_lora(params)
    quantized = quantize.quantization(params)
    if merge_lora and quantized and attached is not None:
        raise ValueError(f"merge_lora=True on a {quantized} base: a merged weight is dense; the sampler keeps "
                         "a quantized base with the adapters unmerged (merge_lora=None or False)")
    merge_lora = not quantized if merge_lora is None else merge_lora
    if is_sampling_params(params):
        if attached is not None and merge_lora:
            params = jax.jit(lora_lib.merge_attached)(params)
        unmerged = attached if not merge_lora else None
        shardings = sampling_shardings(cfg, mesh, dtype, unmerged, quantized) if mesh is not None else None
        cast = jax.tree.map(lambda x: _cast(x, dtype), params, is_leaf=_is_q)
        return jax.device_put(cast, shardings) if shardings is not None else cast
    return _converter(cfg, dtype.name, mesh, None if merge_lora else attached, quantized)(params)


def measure_reshard(cfg: ModelConfig, params: dict, mesh: jax.sharding.Mesh | None, *, dtype=None,
                    repeats: int = 3) -> dict:
    """Times `to_sampling_params` (after one warm-up call that compiles it) and reports bytes.

    Returns {"seconds": best wall time, "param_bytes_in": bytes of the training params,
    "param_bytes_out": bytes of the sampling params, "per_device_bytes_out": max bytes any device
    holds afterwards}. On one device this is a cast and an unstacking copy; on a mesh it adds the
    all-gather over fsdp.
    """
    out = to_sampling_params(cfg, params, mesh=mesh, dtype=dtype)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = to_sampling_params(cfg, params, mesh=mesh, dtype=dtype)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    per_dev: dict = {}
    for x in jax.tree.leaves(out):
        for shard in x.addressable_shards:
            per_dev[shard.device] = per_dev.get(shard.device, 0) + int(np.prod(shard.data.shape)) * x.dtype.itemsize
    return {"seconds": best, "param_bytes_in": nbytes(params), "param_bytes_out": nbytes(out),
            "per_device_bytes_out": max(per_dev.values())}
