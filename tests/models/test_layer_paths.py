"""The model's alternative computation paths give the computation they replace: the Python loop over layers
(ModelConfig.scan_layers=False) against the layer scan, the causal attention in query blocks against
one attention over the whole mask, the MLP's gate / up matmul over stacked weights against two matmuls
(with LoRA adapters attached too), and the log-probs with and without recomputed logits. Values and
every gradient leaf; plus that each path is really the one taken (the program's structure)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib.util
import os

from masa_jax import config as config_lib
from masa_jax.errors import UserError
from masa_jax.models import qwen
from masa_jax.models.qwen import attention as attn_lib
from masa_jax.models.qwen import logprobs as logprobs_lib
from masa_jax.models.qwen import lora
from masa_jax.models.qwen import model as model_lib

# T = 128 gives two query blocks of 64; B * T = 512 tokens reach FUSED_GATE_UP_MIN_TOKENS.
CFG = qwen.ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=8)
B, T = 4, 128


@pytest.fixture(scope="module")
def setup(random_params_fn):
    rng = np.random.RandomState(0)
    params = random_params_fn(CFG, rng)
    tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (B, T)), jnp.int32)
    mask = np.ones((B, T), bool)
    mask[1, :40] = False   # left padding, across the first query block's boundary
    mask[2, :100] = False  # ... and into the second
    return params, tokens, jnp.asarray(mask)


def value_and_grad(cfg, params, tokens, mask):
    def loss(p):
        return jnp.sum(qwen.token_logprobs(cfg, p, tokens, mask, chunk_size=64) * mask)
    return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(got, want, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(np.max(np.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=2e-6 * scale)


# --------------------------------------------------------------------------------- scan_layers


@pytest.mark.parametrize("remat", ["none", "full"])
def test_layer_loop_equals_the_scan(setup, remat):
    params, tokens, mask = setup
    scanned, looped = CFG.replace(remat=remat), CFG.replace(remat=remat, scan_layers=False)
    (v0, g0), (v1, g1) = value_and_grad(scanned, params, tokens, mask), value_and_grad(looped, params, tokens, mask)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    assert float(v0) < -100  # a real signal: sum of ~300 log-probs
    assert_trees_close(g1, g0)
    # the looped program has no layer loop (the log-prob chunk scan stays)
    loops = lambda cfg: jax.jit(lambda p: qwen.token_logprobs(cfg, p, tokens, mask, chunk_size=64)).lower(
        params).as_text().count("stablehlo.while")
    assert loops(looped) == loops(scanned) - 1


def test_layer_loop_with_quantized_base_and_adapters(setup):
    """The loop slices every stacked leaf, QLoRA's quantized weights and attached adapters included."""
    params, tokens, mask = setup
    from masa_jax.models.qwen import quantize
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, base_quantization="int8")
    adapters = lora.init_adapters(CFG, lcfg, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0: the adapters change the output
    base = quantize.quantize_base(params, lcfg.base_quantization)
    policy = lora.attach(base, adapters, lcfg)
    out = {s: jax.jit(lambda p, cfg=CFG.replace(scan_layers=s): qwen.token_logprobs(cfg, p, tokens, mask))(policy)
           for s in (True, False)}
    np.testing.assert_allclose(np.asarray(out[False]), np.asarray(out[True]), rtol=1e-5, atol=1e-5)
    plain = jax.jit(lambda p: qwen.token_logprobs(CFG, p, tokens, mask))(params)
    assert float(jnp.abs(out[False] - plain).max()) > 1e-3  # the adapters (and quantization) do something


def _config(name: str):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_scan_layers_false_refuses_an_unroll():
    with pytest.raises(ValueError, match="scan_layers=False runs no scan"):
        CFG.replace(scan_layers=False, scan_unroll=2)
    with pytest.raises(UserError, match=r"config.model.scan_unroll=3 .* config.model.scan_layers=False"):
        config_lib.resolve(config_lib.override(_config("tiny"), {"model.scan_unroll": 3}))
    assert config_lib.resolve(_config("tiny")).model.scan_layers is False   # the CPU config loops
    assert config_lib.resolve(_config("qwen8b")).model.scan_layers is True  # accelerator configs scan


# --------------------------------------------------------------------------- causal attention


def test_query_blocks():
    assert [attn_lib.query_blocks(t) for t in (1, 11, 64, 100, 127, 128, 192, 256, 512, 1024, 8192)] == \
        [1, 1, 1, 1, 1, 2, 3, 4, 8, 8, 8]


def _qkv(Tq, S, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, Tq, CFG.num_heads, CFG.head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(B, S, CFG.num_kv_heads, CFG.head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(B, S, CFG.num_kv_heads, CFG.head_dim), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("Tq,offset", [(128, 0), (256, 0), (128, 24)])
def test_blocked_causal_attention_equals_one_attention(setup, Tq, offset):
    """Blocks over the training mask (left padding) and over the shared-prefix suffix mask (offset: every
    real prefix key, then causal over the suffix), values and q / k / v gradients."""
    _, _, mask = setup
    valid = jnp.pad(mask, ((0, 0), (Tq - T, 0)), constant_values=True)
    causal = attn_lib.causal_mask(valid)
    if offset:
        prefix_valid = jnp.arange(offset)[None, :] < jnp.asarray([24, 10, 1, 17])[:, None]
        full = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None, :], (B, Tq, offset)), causal], axis=-1)
    else:
        full = causal
    q, k, v = _qkv(Tq, offset + Tq)
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    blocked = run(lambda q, k, v: attn_lib.causal_attention(CFG, q, k, v, full, key_offset=offset))
    whole = run(lambda q, k, v: attn_lib.attention(CFG, q, k, v, full))
    np.testing.assert_allclose(float(blocked[0]), float(whole[0]), rtol=1e-5)
    assert_trees_close(blocked[1], whole[1])
    # really in blocks: one score matmul per block, each over the keys before the block's end only
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attn_lib.causal_attention(CFG, q, k, v, full, key_offset=offset))(
        q, k, v))
    n = attn_lib.query_blocks(Tq)
    assert n > 1 and jaxpr.count("dot_general") == 2 * n
    assert f"{offset + Tq // n}," in jaxpr.replace(" ", "")  # the first block's key length



def test_cudnn_attention_is_not_cut(monkeypatch):
    """cuDNN's kernel handles the mask itself: one call over all queries (recorded; no cuDNN on CPU)."""
    calls = []
    monkeypatch.setattr(attn_lib, "attention", lambda cfg, q, k, v, mask: calls.append(q.shape) or q)
    q, k, v = _qkv(256, 256)
    attn_lib.causal_attention(CFG.replace(attention_impl="cudnn"), q, k, v, jnp.ones((B, 256, 256), bool))
    attn_lib.causal_attention(CFG, q, k, v, jnp.ones((B, 256, 256), bool))
    assert calls == [q.shape] + [(B, 64, CFG.num_heads, CFG.head_dim)] * 4


# ------------------------------------------------------------------------------------ fused MLP


@pytest.mark.parametrize("with_adapters", [False, True])
def test_stacked_gate_up_equals_two_matmuls(setup, monkeypatch, with_adapters):
    params, _, _ = setup
    lp = {k: params["layers"][k][0] for k in ("gate_proj", "up_proj", "down_proj")}
    if with_adapters:
        lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("gate_proj", "up_proj", "down_proj"))
        ad = jax.tree.map(lambda x: x[0] + 0.1, lora.init_adapters(CFG, lcfg, jax.random.key(2))["layers"])
        lp = dict(lp, lora=ad)
    h = jnp.asarray(np.random.RandomState(3).randn(B, T, CFG.hidden_size), jnp.float32)
    w = jnp.asarray(np.random.RandomState(4).randn(B, T, CFG.hidden_size), jnp.float32)

    def run():
        f = lambda lp, h: jnp.sum(model_lib.mlp(lp, h) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(lp, h), str(jax.make_jaxpr(lambda lp, h: model_lib.mlp(lp, h))(lp, h))

    (fused, g_fused), fused_jaxpr = run()
    monkeypatch.setattr(model_lib, "FUSED_GATE_UP_MIN_TOKENS", B * T + 1)
    (plain, g_plain), plain_jaxpr = run()
    assert "stack" not in plain_jaxpr and ("concatenate" in fused_jaxpr or "stack" in fused_jaxpr)
    np.testing.assert_allclose(float(fused), float(plain), rtol=1e-5)
    assert abs(float(plain)) > 1.0
    assert_trees_close(g_fused, g_plain)


def test_decode_sized_inputs_keep_two_matmuls(setup):
    params, _, _ = setup
    lp = jax.tree.map(lambda w: w[0], params["layers"])
    small = jnp.ones((8, 1, CFG.hidden_size), jnp.float32)  # 8 decode slots, one token each
    jaxpr = str(jax.make_jaxpr(model_lib.mlp)(lp, small))
    assert jaxpr.count("dot_general") == 3 and "concatenate" not in jaxpr


# ------------------------------------------------------------------------------ log-prob remat


def test_logits_are_recomputed_only_when_large(setup, monkeypatch):
    params, tokens, mask = setup
    jaxpr = lambda: str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(qwen.token_logprobs(  # noqa: E731
        CFG, p, tokens, mask, chunk_size=64))))(params))
    kept = value_and_grad(CFG, params, tokens, mask)
    assert "checkpoint" not in jaxpr() and "remat" not in jaxpr()  # 4 x 127 x 64 float32 logits: kept
    monkeypatch.setattr(logprobs_lib, "REMAT_LOGITS_BYTES", B * T * CFG.vocab_size * 4 // 2)
    assert "checkpoint" in jaxpr() or "remat" in jaxpr()
    recomputed = value_and_grad(CFG, params, tokens, mask)
    np.testing.assert_allclose(float(recomputed[0]), float(kept[0]), rtol=1e-6)
    assert_trees_close(recomputed[1], kept[1])
