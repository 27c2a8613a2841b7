"""The HF-name <-> masa_jax param rules for Qwen: one table, used by import and export alike.

Each rule says where an HF tensor lives in our tree, whether it is stacked over layers, and how its
layout changes (HF linear weights are [out, in]; ours are [in, ...out] with heads split out).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from masa_jax.models.qwen.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamRule:
    path: tuple[str, ...]            # where the tensor lives in our params tree
    hf_name: str                     # HF name; "{i}" is the layer index for per-layer tensors
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]   # one HF tensor -> one (unstacked) slice
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]     # inverse

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(w, cfg):
    return w


def _linear_in_heads(n_heads_attr):
    """HF [N*hd, D] -> ours [D, N, hd]."""
    def to_ours(w, cfg):
        return w.T.reshape(cfg.hidden_size, getattr(cfg, n_heads_attr), cfg.head_dim)

    def to_hf(w, cfg):
        return w.reshape(cfg.hidden_size, -1).T
    return to_ours, to_hf


def _bias_heads(n_heads_attr):
    def to_ours(w, cfg):
        return w.reshape(getattr(cfg, n_heads_attr), cfg.head_dim)

    def to_hf(w, cfg):
        return w.reshape(-1)
    return to_ours, to_hf


def _o_proj_to_ours(w, cfg):  # HF [D, H*hd] -> ours [H, hd, D]
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_proj_to_hf(w, cfg):
    return w.reshape(-1, cfg.hidden_size).T


def _transpose(w, cfg):
    return w.T


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."


def param_rules(cfg: ModelConfig) -> list[ParamRule]:
    """Every tensor of the checkpoint for this config, in a fixed order."""
    rules = [
        ParamRule(("embed",), "model.embed_tokens.weight", _same, _same),
        ParamRule(("layers", "attn_norm"), "model.layers.{i}.input_layernorm.weight", _same, _same),
        ParamRule(("layers", "q_proj"), _ATTN + "q_proj.weight", *_linear_in_heads("num_heads")),
        ParamRule(("layers", "k_proj"), _ATTN + "k_proj.weight", *_linear_in_heads("num_kv_heads")),
        ParamRule(("layers", "v_proj"), _ATTN + "v_proj.weight", *_linear_in_heads("num_kv_heads")),
        ParamRule(("layers", "o_proj"), _ATTN + "o_proj.weight", _o_proj_to_ours, _o_proj_to_hf),
        ParamRule(("layers", "mlp_norm"), "model.layers.{i}.post_attention_layernorm.weight", _same, _same),
        ParamRule(("layers", "gate_proj"), _MLP + "gate_proj.weight", _transpose, _transpose),
        ParamRule(("layers", "up_proj"), _MLP + "up_proj.weight", _transpose, _transpose),
        ParamRule(("layers", "down_proj"), _MLP + "down_proj.weight", _transpose, _transpose),
        ParamRule(("final_norm",), "model.norm.weight", _same, _same),
    ]
    if cfg.qkv_bias:
        rules += [
            ParamRule(("layers", "q_bias"), _ATTN + "q_proj.bias", *_bias_heads("num_heads")),
            ParamRule(("layers", "k_bias"), _ATTN + "k_proj.bias", *_bias_heads("num_kv_heads")),
            ParamRule(("layers", "v_bias"), _ATTN + "v_proj.bias", *_bias_heads("num_kv_heads")),
        ]
    if cfg.qk_norm:
        rules += [
            ParamRule(("layers", "q_norm"), _ATTN + "q_norm.weight", _same, _same),
            ParamRule(("layers", "k_norm"), _ATTN + "k_norm.weight", _same, _same),
        ]
    if not cfg.tie_word_embeddings:
        rules.append(ParamRule(("lm_head",), "lm_head.weight", _transpose, _transpose))
    return rules


def hf_names(rule: ParamRule, cfg: ModelConfig) -> list[str]:
    """The HF tensor name(s) behind one rule: one per layer for stacked params."""
    if rule.per_layer:
        return [rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
    return [rule.hf_name]


def params_from_state_dict(cfg: ModelConfig, state: dict[str, np.ndarray]) -> dict:
    """Host-side conversion of a full in-memory HF state dict (small models and tests only; real
    checkpoints stream through `checkpoint.from_pretrained`)."""
    params: dict = {}
    for rule in param_rules(cfg):
        names = hf_names(rule, cfg)
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"missing tensor {missing[0]!r}")
        parts = [rule.to_ours(np.asarray(state[n]), cfg) for n in names]
        value = np.stack(parts) if rule.per_layer else parts[0]
        node = params
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        node[rule.path[-1]] = value.astype(cfg.param_dtype)
    return params
