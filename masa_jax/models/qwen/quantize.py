"""A frozen base stored quantized (QLoRA): int8 / int4 / nf4 projection weights through qwix.

With LoRA the base weights never change, so they can be kept in fewer bits: each of the seven projection
weights of every layer (`PROJECTIONS`, whether or not LoRA targets it) becomes a `qwix.QArray` (qvalue
of the weight's shape in the quantized type, plus scales), made once when the run builds its train state
from the HF weights. Embeddings, norms and biases stay in `model.param_dtype`. `model.cast_layer`
dequantizes one layer's weights to the compute dtype inside the scanned layer body (`qwix.dequantize`),
so only one layer's dense weights exist at a time, in training, in the old-log-prob pass and in the
sampler (which then keeps the adapters unmerged: merging would turn the base dense again).

Scales are symmetric absmax (qwix's default) per layer and output channel; the 4-bit types also get one
scale per `BLOCK` input features (QLoRA's block-wise quantization) where the input axis divides into
blocks. Quantizing is deterministic, so a resume rebuilds the same base.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import qwix

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.model import PROJECTION_IN_DIMS, param_logical_axes, param_shapes
from masa_jax.parallel.rules import TRAIN_RULES, tree_shardings

Params = dict

QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
PROJECTIONS = tuple(PROJECTION_IN_DIMS)
BLOCK = 64  # input features per scale for the 4-bit types (QLoRA's block size)


def quantize_weight(w: jax.Array, qtype: str, num_in_dims: int) -> qwix.QArray:
    """A stacked projection weight [L, *in, *out] -> QArray with scales per (layer, output channel); for
    the 4-bit types also per block of `BLOCK` input features (o_proj's [heads, head_dim] input: per head
    and block of head_dim) where the last input axis is a multiple of a block."""
    in_axes = tuple(range(1, 1 + num_in_dims))
    channelwise = tuple(a for a in range(w.ndim) if a not in in_axes)
    tiled = None
    if qtype != "int8":
        tiled = {a: 1 for a in in_axes[:-1]}
        if w.shape[in_axes[-1]] > BLOCK and w.shape[in_axes[-1]] % BLOCK == 0:
            tiled[in_axes[-1]] = BLOCK
    return qwix.quantize(w, QTYPES[qtype], channelwise_axes=channelwise, tiled_axes=tiled or None)


def quantize_base(params: Params, qtype: str) -> Params:
    """Stacked params with every projection weight quantized (`quantize_weight`); the rest as it is."""
    layers = dict(params["layers"])
    for name in PROJECTIONS:
        layers[name] = quantize_weight(layers[name], qtype, PROJECTION_IN_DIMS[name])
    return dict(params, layers=layers)


def quantized_shapes(cfg: ModelConfig, qtype: str) -> Params:
    """ShapeDtypeStructs of `quantize_base(params)` for params in `cfg.param_dtype` (no allocation)."""
    return jax.eval_shape(functools.partial(quantize_base, qtype=qtype), param_shapes(cfg))


def quantized_logical_axes(cfg: ModelConfig, qtype: str) -> Params:
    """Logical axes in the structure of `quantized_shapes`: a QArray's qvalue and scales take the weight's
    axes (a scale axis of size 1 or of blocks is then replicated by `logical_to_spec`'s divisibility check)."""
    axes = param_logical_axes(cfg)
    shapes = quantized_shapes(cfg, qtype)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub), axes, shapes, is_leaf=is_axes)


def quantized_shardings(cfg: ModelConfig, qtype: str, mesh: jax.sharding.Mesh, rules=TRAIN_RULES) -> Params:
    """NamedShardings of `quantize_base(params)` in the layout `rules` gives the dense params."""
    return tree_shardings(quantized_logical_axes(cfg, qtype), quantized_shapes(cfg, qtype), mesh, rules)


def place_quantized(cfg: ModelConfig, params: Params, qtype: str, mesh: jax.sharding.Mesh) -> Params:
    """`params` (dense, host or device) -> the quantized base laid out on `mesh` (TRAIN_RULES). One weight
    at a time, so the peak is the dense input plus one weight's quantized copy."""
    sh = quantized_shardings(cfg, qtype, mesh)
    layers = dict(params["layers"])
    for name in PROJECTIONS:
        fn = jax.jit(quantize_weight, static_argnums=(1, 2), out_shardings=sh["layers"][name])
        layers[name] = fn(layers[name], qtype, PROJECTION_IN_DIMS[name])
    return jax.device_put(dict(params, layers=layers), sh)


def quantization(params: Params) -> str:
    """The quantized type of the (stacked or per-layer) params' projection weights ("" for a dense base)."""
    layer = params["layers"][0] if isinstance(params["layers"], (tuple, list)) else params["layers"]
    for w in layer.values():
        if isinstance(w, qwix.QArray):
            return next(name for name, t in QTYPES.items() if t == w.qtype)
    return ""
