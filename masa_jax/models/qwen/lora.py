"""LoRA adapters for the Qwen decoder, as pure functions over plain pytrees.

A target projection W (one of `TARGETS`, our layout [*in, *out], stacked over layers) gets two trainable
factors, A [L, *in, r] and B [L, r, *out], and the adapted weight is

    W' = W + (alpha / r) * A @ B          (contracting the rank axis)

which is PEFT's `W_hf + scaling * lora_B.weight @ lora_A.weight` in the HF layout (`lora_A.weight`
[r, in_features] is our A transposed, `lora_B.weight` [out_features, r] our B transposed, heads
flattened the way `params.param_rules` flattens them). As in PEFT, A starts uniform in +-1/sqrt(in)
and B at zero, so a fresh adapter leaves the model unchanged.

Adapters tree: {"layers": {name: {"a": A, "b": B}}} for the configured targets. Two ways to run the
model on (base, adapters):

- `attach` (unmerged): the base params with `params["layers"]["lora"] = {name: {"a": A, "b": scale * B}}`;
  `model.decoder_layer` adds x @ A @ (scale B) to each targeted projection. The training forward uses
  it: no merged copy of any weight exists, gradients reach A and B through the low-rank path.
- `merge` (merged): plain params with W' in place of W: what the sampler, `evaluate` and the HF
  export use.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.model import PROJECTION_IN_DIMS, dense, param_logical_axes, param_shapes
from masa_jax.models.qwen.quantize import QTYPES

Params = dict

# Projections LoRA can adapt: our param names, which are also PEFT's / HF's module names.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}
ATTACHED_KEY = "lora"  # where `attach` puts the scaled adapters inside params["layers"]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1, alpha (scale = alpha / r, PEFT's default scaling), the adapted projections, and
    how the frozen base is stored: "" in `model.param_dtype`, or "int8" / "int4" / "nf4" (QLoRA,
    `quantize.py`: every projection weight quantized through qwix)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    base_quantization: str = ""

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if self.rank < 1 or not self.targets or bad:
            raise ValueError(f"LoraConfig needs rank >= 1 and targets from {TARGETS}, got rank={self.rank}, "
                             f"targets={self.targets}")
        if self.base_quantization not in ("",) + tuple(QTYPES):
            raise ValueError(f"LoraConfig.base_quantization must be one of {('',) + tuple(QTYPES)}, got "
                             f"{self.base_quantization!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------------------------ shapes


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
    """float32 ShapeDtypeStructs of the adapters: A [L, *in, r], B [L, r, *out] per target."""
    layers = param_shapes(cfg)["layers"]
    out = {}
    for name in lcfg.targets:
        shape, n_in = layers[name].shape, PROJECTION_IN_DIMS[name]
        out[name] = {"a": jax.ShapeDtypeStruct(shape[:1 + n_in] + (lcfg.rank,), jnp.float32),
                     "b": jax.ShapeDtypeStruct(shape[:1] + (lcfg.rank,) + shape[1 + n_in:], jnp.float32)}
    return {"layers": out}


def adapter_logical_axes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
    """Logical axes of the adapters: A takes its weight's input axes, B its output axes; the rank axis
    is replicated (it is small)."""
    axes = param_logical_axes(cfg)["layers"]
    out = {}
    for name in lcfg.targets:
        ax, n_in = axes[name], PROJECTION_IN_DIMS[name]
        out[name] = {"a": ax[:1 + n_in] + (None,), "b": ax[:1] + (None,) + ax[1 + n_in:]}
    return {"layers": out}


def num_adapter_params(cfg: ModelConfig, lcfg: LoraConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_shapes(cfg, lcfg)))


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, rng: jax.Array) -> Params:
    """PEFT's initialisation: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a=sqrt(5)),
    B = 0. float32."""
    shapes = adapter_shapes(cfg, lcfg)["layers"]
    keys = jax.random.split(rng, len(shapes))
    out = {}
    for key, (name, s) in zip(keys, shapes.items()):
        fan_in = math.prod(s["a"].shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out[name] = {"a": jax.random.uniform(key, s["a"].shape, jnp.float32, -bound, bound),
                     "b": jnp.zeros(s["b"].shape, jnp.float32)}
    return {"layers": out}


# ------------------------------------------------------------------------------- merged / unmerged


def delta(a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
    """A @ B over the rank axis: one layer ([*in, r], [r, *out] -> [*in, *out]) or, `stacked`, every
    layer ([L, *in, r], [L, r, *out] -> [L, *in, *out])."""
    if stacked:
        return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
    return jnp.tensordot(a, b, axes=1)


def attach(params: Params, adapters: Params, lcfg: LoraConfig) -> Params:
    """Unmerged policy params: the base params with the adapters (B scaled by alpha / r) under
    params["layers"]["lora"], read by `model.decoder_layer`. Shares the base arrays (no copy)."""
    scaled = {name: {"a": ab["a"], "b": ab["b"] * lcfg.scale} for name, ab in adapters["layers"].items()}
    return dict(params, layers=dict(params["layers"], **{ATTACHED_KEY: scaled}))


def merge_attached(params: Params) -> Params:
    """Unmerged (attached) policy params -> plain params with W + A @ (scale B) for every adapted W, in
    W's dtype; params without adapters are returned as they are. Works on stacked and per-layer params."""
    if isinstance(params["layers"], (tuple, list)):
        return dict(params, layers=type(params["layers"])(_merge_layer(lp) for lp in params["layers"]))
    return dict(params, layers=_merge_layer(params["layers"]))


def _merge_layer(lp: Params) -> Params:
    if ATTACHED_KEY not in lp:
        return lp
    out = {k: v for k, v in lp.items() if k != ATTACHED_KEY}
    for name, ab in lp[ATTACHED_KEY].items():
        w = out[name]
        # A quantized base weight (QLoRA) is dequantized: the merged weight is dense, in the scales' dtype.
        dtype = w.scale.dtype if isinstance(w, qwix.QArray) else w.dtype
        w = dense(w, jnp.float32)
        stacked = w.ndim == ab["a"].ndim + ab["b"].ndim - 3  # both factors carry the layer axis
        d = delta(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), stacked)
        out[name] = (w + d).astype(dtype)
    return out


def merge(params: Params, adapters: Params, lcfg: LoraConfig) -> Params:
    """Merged params: W + (alpha / r) A @ B for every adapted W (float32 arithmetic, W's dtype)."""
    return merge_attached(attach(params, adapters, lcfg))


# ------------------------------------------------------------------------------------- PEFT export


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_state_dict(cfg: ModelConfig, adapters: Params) -> dict[str, np.ndarray]:
    """PEFT's tensor names and layout for the adapters (float32):
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in], ...lora_B.weight [out, r]."""
    out = {}
    for name, ab in adapters["layers"].items():
        a, b = np.asarray(jax.device_get(ab["a"]), np.float32), np.asarray(jax.device_get(ab["b"]), np.float32)
        r = a.shape[-1]
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[name]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def adapters_from_peft_state_dict(cfg: ModelConfig, lcfg: LoraConfig, state: dict[str, np.ndarray]) -> Params:
    """Inverse of `peft_state_dict`."""
    shapes = adapter_shapes(cfg, lcfg)["layers"]
    out = {}
    for name, s in shapes.items():
        a, b = [], []
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[name]}"
            a.append(np.asarray(state[f"{prefix}.lora_A.weight"]).T.reshape(s["a"].shape[1:]))
            b.append(np.asarray(state[f"{prefix}.lora_B.weight"]).T.reshape(s["b"].shape[1:]))
        out[name] = {"a": np.stack(a).astype(np.float32), "b": np.stack(b).astype(np.float32)}
    return {"layers": out}


def peft_adapter_config(lcfg: LoraConfig, base_model_path: str = "") -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a causal-LM LoRA (no dropout, no bias, PEFT's default
    alpha / r scaling)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path or None,
            "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(lcfg.targets), "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def save_peft_adapter(cfg: ModelConfig, lcfg: LoraConfig, adapters: Params, path: str | os.PathLike, *,
                      base_model_path: str = "") -> None:
    """Writes `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout) into `path`, which
    `peft.PeftModel.from_pretrained(<transformers Qwen from base_model_path>, path)` loads."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lcfg, base_model_path), indent=2))
    save_file(peft_state_dict(cfg, adapters), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


ADAPTER_SUBDIR = "adapter"


def save_pretrained(cfg: ModelConfig, lcfg: LoraConfig, params: Params, adapters: Params,
                    path: str | os.PathLike, *, base_model_path: str = "", peft_adapter: bool = True,
                    **save_kwargs) -> None:
    """The HF export of a LoRA policy (every process calls it, as `qwen.save_pretrained`): merged weights (W + alpha/r A B) as `qwen.save_pretrained` writes
    them into `path` (`save_kwargs`: dtype, max_shard_size, tokenizer_dir), and with `peft_adapter` the
    PEFT layout of the adapters alone in `path/adapter/`. A subfolder, because `transformers` sees an
    adapter_config.json next to the weights as "load base_model_name_or_path and apply this adapter",
    which would apply the adapter twice to merged weights."""
    from masa_jax.models.qwen.checkpoint import _to_host, save_pretrained as save_dense

    save_dense(cfg, jax.jit(merge, static_argnums=2)(params, adapters, lcfg), path, **save_kwargs)
    if peft_adapter:
        host_adapters = jax.tree.map(_to_host, adapters)  # collective on multi-host meshes: every process
        if jax.process_index() == 0:
            save_peft_adapter(cfg, lcfg, host_adapters, Path(path) / ADAPTER_SUBDIR, base_model_path=base_model_path)
