"""Qwen3 / Qwen2 / Qwen2.5 decoder as pure functions over a plain params pytree.

Params layout (L = layers, D = hidden, H / KV = query / kv heads, hd = head_dim, F = ffn, V = vocab):

    embed            [V, D]          ("vocab", "embed")
    layers/          every leaf stacked over a leading L axis, scanned with `lax.scan`
      attn_norm      [L, D]
      q_proj         [L, D, H, hd]    k_proj, v_proj [L, D, KV, hd]
      q_bias         [L, H, hd]       k_bias, v_bias [L, KV, hd]        (qwen2 only)
      q_norm, k_norm [L, hd]                                            (qwen3 only)
      o_proj         [L, H, hd, D]
      mlp_norm       [L, D]
      gate_proj, up_proj [L, D, F]    down_proj [L, F, D]
      lora           {name: {"a", "b"}} only in a LoRA policy's params (`lora.attach`): added low-rank paths
    final_norm       [D]
    lm_head          [D, V]          (absent when embeddings are tied)

`decoder_layer` is the one layer body: the training forward scans it over stacked layers, the sampler's
prefill and decode step (`sampling/engine.py`) run it unrolled over per-layer params. Only how a layer
attends differs between them, passed in as an `attend` closure (`attention.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix

from masa_jax.models.qwen.attention import (Attend, attention, causal_mask, join_streams,  # noqa: F401
                                           sequence_attention, shared_prefix_attention, split_streams)
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.parallel.rules import constrain

Params = dict

# The seven projection weights ([L, *in, *out]) and how many of their leading dims (after the layer
# axis) are input features: what LoRA adapts and what a quantized base (`quantize.py`) stores in few bits.
PROJECTION_IN_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                      "down_proj": 1}

# ------------------------------------------------------------------------------------------- params


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter, in the same tree structure as the params."""
    layers = {
        "attn_norm": ("layers", "norm"),
        "q_proj": ("layers", "embed", "heads", "head_dim"),
        "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
        "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
        "o_proj": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "gate_proj": ("layers", "embed", "mlp"),
        "up_proj": ("layers", "embed", "mlp"),
        "down_proj": ("layers", "mlp", "embed"),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=("layers", "heads", "head_dim"), k_bias=("layers", "kv_heads", "head_dim"),
                      v_bias=("layers", "kv_heads", "head_dim"))
    if cfg.qk_norm:
        layers.update(q_norm=("layers", "norm"), k_norm=("layers", "norm"))
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> Params:
    """jax.ShapeDtypeStruct of every parameter (no allocation), in the params tree structure."""
    L, D, H, KV, hd, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    layers = {
        "attn_norm": (L, D), "q_proj": (L, D, H, hd), "k_proj": (L, D, KV, hd), "v_proj": (L, D, KV, hd),
        "o_proj": (L, H, hd, D), "mlp_norm": (L, D), "gate_proj": (L, D, F), "up_proj": (L, D, F),
        "down_proj": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=(L, H, hd), k_bias=(L, KV, hd), v_bias=(L, KV, hd))
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, cfg.jnp_param_dtype), shapes, is_leaf=is_shape)


def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random params (normal(std) matrices, unit norms, zero biases) in `cfg.param_dtype`.

    Jit it with `out_shardings` (see `masa_jax.parallel.rules.tree_shardings`) to create sharded params
    without materialising them on one device.
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, s), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path[-1:])
        if "norm" in name:
            out.append(jnp.ones(s.shape, s.dtype))
        elif "bias" in name:
            out.append(jnp.zeros(s.shape, s.dtype))
        else:
            out.append((std * jax.random.normal(key, s.shape, jnp.float32)).astype(s.dtype))
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as HF does), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """int32 [B, T] positions that count only real tokens, so a left-padded row sees the same
    positions (0, 1, ...) as the unpadded one; padding gets position 0."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """float32 cos/sin [..., head_dim] for the given integer positions (HF's rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd]; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def project(lp: Params, name: str, equation: str, x: jax.Array) -> jax.Array:
    """x through the layer's projection `name` (`equation`: the einsum of x and the weight), plus the
    low-rank LoRA path x @ A @ B when the layer carries attached adapters (`lora.attach`: lp["lora"],
    B already scaled by alpha / r), so no merged weight is formed."""
    return with_lora(lp, name, x, jnp.einsum(equation, x, lp[name]))


def with_lora(lp: Params, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y (x through the base weight of projection `name`) plus its LoRA path, if the layer has one."""
    adapter = lp.get("lora", {}).get(name)
    if adapter is None:
        return y
    a, b = adapter["a"], adapter["b"]
    low = jnp.tensordot(x, a, axes=a.ndim - 1)  # [B, T, r]: contracts x's input dims with A's
    return y + jnp.tensordot(low, b, axes=1).astype(y.dtype)


def project_qkv(cfg: ModelConfig, lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array):
    """Normed hidden h [B, T, D] -> q [B, T, H, hd], k / v [B, T, KV, hd], with bias / q-k norm and RoPE."""
    q = project(lp, "q_proj", "btd,dnh->btnh", h)
    k = project(lp, "k_proj", "btd,dnh->btnh", h)
    v = project(lp, "v_proj", "btd,dnh->btnh", h)
    if cfg.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "act_heads", None))
    k = constrain(k, ("batch", "seq", "act_kv_heads", None))
    v = constrain(v, ("batch", "seq", "act_kv_heads", None))
    return q, k, v


def attention_output(lp: Params, attn: jax.Array) -> jax.Array:
    # As one [H * hd, D] matmul: with the two contracted axes kept apart, XLA CPU transposed the weight
    # (to the attention output's layout) in every decode step.
    B, T, H, hd = attn.shape
    w = lp["o_proj"]
    y = jnp.einsum("btf,fd->btd", attn.reshape(B, T, H * hd), w.reshape((H * hd,) + w.shape[2:]))
    return with_lora(lp, "o_proj", attn, y)


# From this many tokens on, the MLP's gate and up projections run as one matmul against the two weights
# stacked (a copy of them per call, small next to the matmul): one input-gradient and one weight-gradient
# matmul in the backward instead of two each, ~10 % of a small model's update on XLA CPU. Decode steps
# (a few tokens per call) keep two matmuls, as the copy would cost them a second read of the weights.
FUSED_GATE_UP_MIN_TOKENS = 512


def mlp(lp: Params, h: jax.Array) -> jax.Array:
    if math.prod(h.shape[:-1]) >= FUSED_GATE_UP_MIN_TOKENS:
        gate_up = jnp.einsum("btd,dkf->btkf", h, jnp.stack([lp["gate_proj"], lp["up_proj"]], axis=1))
        gate, up = (y[:, :, 0] for y in jnp.split(gate_up, 2, axis=2))  # split: its gradient concatenates
        gate, up = with_lora(lp, "gate_proj", h, gate), with_lora(lp, "up_proj", h, up)
    else:
        gate = project(lp, "gate_proj", "btd,df->btf", h)
        up = project(lp, "up_proj", "btd,df->btf", h)
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    return project(lp, "down_proj", "btf,fd->btd", act)


def dense(w, dtype) -> jax.Array:
    """A weight as a dense array in `dtype`; a quantized one (`qwix.QArray`, `quantize.py`) dequantized."""
    if isinstance(w, qwix.QArray):
        return qwix.dequantize(w).astype(dtype)
    return w.astype(dtype)


def cast_layer(cfg: ModelConfig, lp: Params) -> Params:
    """Layer params in the compute dtype; norms and biases too (HF applies them in the input dtype).
    Quantized weights are dequantized here, one layer at a time."""
    return jax.tree.map(lambda w: dense(w, cfg.jnp_dtype), lp, is_leaf=lambda x: isinstance(x, qwix.QArray))


def embed(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    # Gather the table over fsdp first (the FSDP all-gather every weight gets): a lookup into an
    # embed-sharded table yields embed-sharded activations for the whole global batch, which the SPMD
    # partitioner can only turn batch-sharded by replicating them ("involuntary full rematerialization").
    table = constrain(params["embed"], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(cfg.jnp_dtype)
    return constrain(x, ("batch", "seq", "act_embed"))


def unembed(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (f32 accumulation from compute dtype)."""
    h = h.astype(cfg.jnp_dtype)
    if cfg.tie_word_embeddings:  # the table as it is ([V, D]): a transposed copy of it cost every decode step
        return jnp.einsum("...d,vd->...v", h, params["embed"].astype(cfg.jnp_dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"].astype(cfg.jnp_dtype), preferred_element_type=jnp.float32)


def remat_policy(name: str):
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        # Keep the weight matmuls' outputs, recompute attention and elementwise ops.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}")


def decoder_layer(cfg: ModelConfig, x: jax.Array, lp: Params, rope: tuple[jax.Array, jax.Array],
                  attend: Attend) -> tuple[jax.Array, Any]:
    """One pre-norm transformer block on x [B, T, D]: the only copy of the layer body, shared by the
    training forward (scanned), the sampler's prefill and its decode step (unrolled over layers).

    lp: this layer's params (any dtype: cast to the compute dtype here). rope: (cos, sin) [B, T, hd] of
    the tokens' positions, computed once per forward (or looked up from a table in decode) rather than
    per layer. attend: how the layer attends (see `attention.py`): full causal attention with a padding
    mask in training, the same plus handing back k / v in prefill, one token against the KV cache in
    decode. Returns (x, what `attend` handed back).
    """
    lp = cast_layer(cfg, lp)
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(cfg, lp, h, *rope)
    attn, aux = attend(q, k, v)
    x = x + attention_output(lp, attn)
    x = constrain(x, ("batch", "seq", "act_embed"))
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    x = x + mlp(lp, h)
    return constrain(x, ("batch", "seq", "act_embed")), aux


# ----------------------------------------------------------------------------------------- forward


def hidden_states(cfg: ModelConfig, params: Params, tokens: jax.Array, attention_mask: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype. tokens int32 [B, T]; attention_mask
    bool [B, T] (True = real token; left padding supported); positions default to the mask's count."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    attend = sequence_attention(cfg, attention_mask)
    return _scan_layers(cfg, params, embed(cfg, params, tokens), rope, attend)


def _scan_layers(cfg: ModelConfig, params: Params, x: jax.Array, rope, attend: Attend) -> jax.Array:
    """The decoder layers over x [B, T, D] (scanned, or a Python loop when `cfg.scan_layers` is False;
    remat per `cfg.remat`), then the final norm."""
    # attend is bound (not an argument): jax.checkpoint only takes arrays.
    layer = functools.partial(decoder_layer, cfg, attend=attend)
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat))

    if cfg.scan_layers:
        def body(x, lp):
            return layer(x, lp, rope)[0], None

        x, _ = jax.lax.scan(body, x, params["layers"], unroll=min(cfg.scan_unroll, cfg.num_layers))
    else:  # each layer's residuals are their own buffers, not slices of stacked ones
        # One split per weight (its gradient: one concatenation, not a padded add per layer).
        split = jax.tree.map(lambda w: jnp.split(w, cfg.num_layers), params["layers"])
        for i in range(cfg.num_layers):
            x = layer(x, jax.tree.map(lambda parts: parts[i][0], split, is_leaf=lambda v: isinstance(v, list)),
                      rope)[0]
    return rms_norm(x, params["final_norm"].astype(cfg.jnp_dtype), cfg.rms_norm_eps)


def shared_prefix_hidden_states(cfg: ModelConfig, params: Params, prefix_tokens: jax.Array,
                                prefix_mask: jax.Array, tokens: jax.Array, attention_mask: jax.Array,
                                prefix_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The forward of rows prompt ++ response where rows share prompts, each prompt computed once.

    Blocks of rows (the leading axis Bk, sharded like a batch): a block's u prompts prefix_tokens
    [Bk, u, P] (right-padded, prefix_mask True on real tokens) and its n responses tokens [Bk, n, S]
    (right-padded, attention_mask True on real tokens), response j continuing prompt prefix_index[:, j].
    Every layer runs once over the block's u * P + n * S tokens (`attention.shared_prefix_attention`),
    instead of n * (P + S) for the unshared rows; positions are those of the unshared row (prompt 0 ..
    p-1, response p ..). Returns final-normed hidden states (prefixes [Bk, u, P, D], responses
    [Bk, n, S, D]); each real token's equals the unshared row's, and so do the gradients.
    """
    Bk, u, P = prefix_tokens.shape
    n, S = tokens.shape[1:]
    prefix_len = jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32)                      # [Bk, u]
    own_len = jnp.take_along_axis(prefix_len, prefix_index, axis=1)                 # [Bk, n]
    prefix_pos = positions_from_mask(prefix_mask)                                   # [Bk, u, P]
    suffix_pos = own_len[..., None] + jnp.arange(S, dtype=jnp.int32)                # [Bk, n, S]
    positions = join_streams(prefix_pos[..., None], suffix_pos[..., None])[..., 0]  # [Bk, u P + n S]
    rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    attend = shared_prefix_attention(cfg, prefix_mask.astype(bool), attention_mask.astype(bool), prefix_index)
    x = embed(cfg, params, join_streams(prefix_tokens[..., None], tokens[..., None])[..., 0])
    h = _scan_layers(cfg, params, x, rope, attend)
    return split_streams(h, u, P, n, S)


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, V]. Materialises the full logits: use `logprobs.token_logprobs` for
    training-size batches."""
    h = hidden_states(cfg, params, tokens, attention_mask, positions)
    return constrain(unembed(cfg, params, h), ("batch", "seq", "act_vocab"))
