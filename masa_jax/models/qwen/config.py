"""ModelConfig: the static description of a Qwen3 / Qwen2 / Qwen2.5 decoder, read from HF config.json."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# HF `architectures` / `model_type` values we can run, and the family they belong to.
_FAMILIES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3",
    "qwen2": "qwen2",
}

REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")


class UnsupportedConfigError(ValueError):
    """The HF config asks for something this port does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable (so it can be a static jit argument) description of one Qwen decoder.

    `param_dtype` is the dtype params are stored in (float32 master weights by default); `dtype` is the
    compute dtype of matmuls and activations (bfloat16 on accelerators). Logits, log-probs, softmax and
    norms are always float32.
    """

    family: str  # "qwen3" (q/k RMSNorm, no qkv bias) or "qwen2" (qkv bias, no q/k norm)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES; applied per scanned layer
    # Layers per iteration of the layer scan (lax.scan's unroll; >= num_layers: fully unrolled). 1 keeps
    # compile time flat in depth (accelerators); on XLA CPU the scan's stacking of per-layer residuals
    # and gradients costs ~15 % of a small model's backward, which unrolling removes (docs/benchmarks.md).
    scan_unroll: int = 1
    # False: the training forward runs the layers in a Python loop (params keep their stacked layout), so
    # each layer's residuals are separate buffers instead of slices of stacked ones that XLA CPU copies
    # and indexes: a faster update on CPU (docs/benchmarks.md), compile time growing with depth.
    scan_layers: bool = True
    # "xla" / "cudnn": jax.nn.dot_product_attention (decode: einsums over the dense cache). "pallas":
    # Pallas TPU kernels, splash attention for training / prefill and paged attention for decode; on
    # other backends it falls back to "xla" with a warning (see models/qwen/attention.py).
    attention_impl: str = "xla"
    pallas_interpret: bool = False  # run the Pallas kernels in interpret mode on any backend (tests)
    # The platform the programs are compiled for: "" = jax.default_backend() (where they run). The
    # compile check (masa_jax.compile_check) sets "tpu" to compile a TPU slice's programs on a CPU host,
    # so attention_impl="pallas" compiles the TPU kernels there instead of falling back to XLA.
    target_platform: str = ""

    def __post_init__(self):
        if self.family not in ("qwen3", "qwen2"):
            raise UnsupportedConfigError(f"unknown model family {self.family!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be an integer >= 1, got {self.scan_unroll!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}")
        if not self.scan_layers and self.scan_unroll != 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} unrolls the layer scan, but scan_layers=False "
                             "runs no scan: set one of them")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + head

    # ---------------------------------------------------------------- HF config.json conversion
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Builds a config from a parsed HF config.json (transformers 4 or 5 layout)."""
        archs = list(hf.get("architectures") or [])
        family = None
        for key in archs + [hf.get("model_type")]:
            if key in _FAMILIES:
                family = _FAMILIES[key]
                break
        if family is None:
            raise UnsupportedConfigError(
                f"unknown architecture {archs or hf.get('model_type')!r}; supported: "
                "Qwen3ForCausalLM, Qwen2ForCausalLM")
        if hf.get("use_sliding_window"):
            raise UnsupportedConfigError("sliding-window attention (use_sliding_window=true) is not supported")
        rope_scaling = hf.get("rope_scaling")
        rope_params = hf.get("rope_parameters") or {}
        for scaling in (rope_scaling, rope_params):
            rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if rope_type not in (None, "default"):
                raise UnsupportedConfigError(f"rope scaling {rope_type!r} is not supported")
        # transformers 5 moved rope_theta under rope_parameters; older configs keep it at top level.
        rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        kw = dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
            else hf.get("eos_token_id"),
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
        if family == "qwen2" and hf.get("attention_bias") is False:
            raise UnsupportedConfigError("Qwen2 without q/k/v bias is not supported")
        if family == "qwen3" and hf.get("attention_bias"):
            raise UnsupportedConfigError("Qwen3 with attention_bias=true is not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
        """The config.json `transformers` needs to load `save_pretrained` output."""
        arch = "Qwen3ForCausalLM" if self.family == "qwen3" else "Qwen2ForCausalLM"
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            # Both layouts, so transformers 4 and 5 read the same theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": torch_dtype or self.param_dtype,
        }
        if self.family == "qwen3":
            d["attention_bias"] = False
        return d
