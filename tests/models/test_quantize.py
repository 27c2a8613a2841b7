"""QLoRA's quantized base (models/qwen/quantize.py, config.lora.base_quantization): the int8 scales are
absmax per (layer, output channel), computed here by hand; the 4-bit types get per-block scales; the model
run on the quantized base is the model run on its dequantized weights; a LoRA train step on the quantized
base is the train step on the dequantized dense base; the sampler keeps the base quantized with the
adapters unmerged and decodes what the dense dequantized base with merged adapters decodes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from masa_jax.models import qwen
from masa_jax.models.qwen import lora, quantize
from masa_jax.models.qwen.model import dense
from masa_jax.parallel import mesh as mesh_lib
from masa_jax.rl import train_step as ts

# hidden 128 and ffn 192: input axes that split into 64-feature blocks (q/k/v/gate/up: 128 = 2 blocks,
# down: 192 = 3 blocks); o_proj's last input axis (head_dim 32) does not: 4-bit scales per head there.
CFG = qwen.ModelConfig(family="qwen3", vocab_size=61, hidden_size=128, intermediate_size=192, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True,
                       max_position_embeddings=128, eos_token_id=1)


def _params():
    return qwen.init_params(CFG, jax.random.key(0))


def _dequantized(params):
    """The quantized base as dense float32 params (what training and sampling effectively use)."""
    return jax.tree.map(lambda w: dense(w, jnp.float32), params, is_leaf=lambda x: isinstance(x, qwix.QArray))


def test_int8_is_absmax_per_layer_and_output_channel_by_hand():
    w = np.asarray(_params()["layers"]["gate_proj"])  # [L, D, F]: input axis 1
    q = quantize.quantize_weight(jnp.asarray(w), "int8", num_in_dims=1)
    # qwix's symmetric int8 maps absmax to 127.5 (the middle of [-128, 127]), then rounds and clips
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.5
    assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (2, 1, 192)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    r, qv = w / np.asarray(q.scale), np.asarray(q.qvalue, np.float32)
    inner = np.abs(r) < 127  # each channel's absmax lands on the tie +-127.5, rounded either way
    np.testing.assert_array_equal(qv[inner], np.round(r[inner]))
    assert np.abs(qv - r).max() <= 0.5 + 1e-4 and qv.min() >= -128 and qv.max() <= 127
    err = np.abs(np.asarray(qwix.dequantize(q)) - w)
    assert (err <= scale / 2 + 1e-7).all() and err.max() > 0

    o = quantize.quantize_weight(_params()["layers"]["o_proj"], "int8", num_in_dims=2)  # [L, H, hd, D]
    assert o.scale.shape == (2, 1, 1, 128)


@pytest.mark.parametrize("qtype,storage", [("int4", jnp.int4), ("nf4", jnp.uint4)])
def test_4bit_types_have_block_scales_where_the_input_axis_divides(qtype, storage):
    p = quantize.quantize_base(_params(), qtype)["layers"]
    assert p["q_proj"].qvalue.dtype == storage
    assert p["q_proj"].scale.shape == (2, 2, 4, 32)      # 128 input features = 2 blocks of 64
    assert p["down_proj"].scale.shape == (2, 3, 128)     # 192 = 3 blocks
    assert p["o_proj"].scale.shape == (2, 4, 1, 128)     # per head; head_dim 32 < one block
    w = np.asarray(_params()["layers"]["q_proj"])
    err = np.abs(np.asarray(qwix.dequantize(p["q_proj"])) - w)
    assert 0 < err.max() < 0.25 * np.abs(w).max()        # 4 bits: coarse, but the weight survives


def test_the_model_on_a_quantized_base_is_the_model_on_its_dequantized_weights():
    params = _params()
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 10)), jnp.int32)
    dense_logits = np.asarray(qwen.forward(CFG, params, tokens))
    for qtype in ("int8", "int4", "nf4"):
        qp = quantize.quantize_base(params, qtype)
        assert quantize.quantization(qp) == qtype and quantize.quantization(params) == ""
        assert qp["embed"] is params["embed"]  # embeddings and norms stay dense
        got = np.asarray(qwen.forward(CFG, qp, tokens))
        np.testing.assert_allclose(got, np.asarray(qwen.forward(CFG, _dequantized(qp), tokens)), atol=2e-6, rtol=0)
        gap = np.abs(got - dense_logits).max()
        assert 0 < gap < (0.05 if qtype == "int8" else 0.5), (qtype, gap)


def _batch(B=4, T=12):
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), bool)
    loss_mask[:, 5:] = True
    return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones((B, T), bool), "loss_mask": jnp.asarray(loss_mask),
            "advantages": jnp.asarray(rng.randn(B).astype(np.float32)),
            "old_logprobs": jnp.asarray(-2.0 - rng.rand(B, T).astype(np.float32))}


def test_a_lora_step_on_a_quantized_base_is_the_step_on_the_dequantized_dense_base():
    mesh = mesh_lib.make_mesh((1, -1, 1))
    ocfg = ts.OptimConfig(lr=1e-2, warmup_steps=0)
    loss_cfg = ts.LossConfig()
    q_lc = lora.LoraConfig(rank=4, alpha=8.0, base_quantization="int8")
    d_lc = lora.LoraConfig(rank=4, alpha=8.0)
    rng = jax.random.key(7)
    q_state = ts.create_train_state(CFG, _params(), ocfg, mesh, lora_cfg=q_lc, lora_rng=rng)
    assert isinstance(q_state.base_params["layers"]["q_proj"], qwix.QArray)
    # host copies: the step donates its state, and the two bases would share the (dense) embeddings
    d_state = ts.create_train_state(CFG, jax.device_get(_dequantized(q_state.base_params)), ocfg, mesh, lora_cfg=d_lc,
                                    lora_rng=rng)
    before = jax.device_get(q_state.params)
    batch = _batch()
    flag = jnp.asarray(True)
    q_new, q_m = ts.make_train_step(CFG, loss_cfg, ocfg, mesh, 4, lora_cfg=q_lc)(q_state, batch, flag)
    d_new, d_m = ts.make_train_step(CFG, loss_cfg, ocfg, mesh, 4, lora_cfg=d_lc)(d_state, batch, flag)
    np.testing.assert_allclose(float(q_m["loss"]), float(d_m["loss"]), rtol=1e-5)
    moved = 0.0
    for x, y, b in zip(jax.tree.leaves(jax.device_get(q_new.params)), jax.tree.leaves(jax.device_get(d_new.params)),
                       jax.tree.leaves(before)):
        np.testing.assert_allclose(x, y, atol=1e-6)
        moved = max(moved, float(np.abs(x - b).max()))
    assert moved > 1e-4  # the adapters trained
    assert isinstance(q_new.base_params["layers"]["q_proj"], qwix.QArray)  # the base stays quantized


def test_the_sampler_keeps_the_base_quantized_and_decodes_like_the_dense_merged_policy():
    import importlib

    from masa_jax.sampling.reshard import to_sampling_params

    gen = importlib.import_module("masa_jax.sampling.generate")  # the package exports a function of that name

    params = _params()
    ad = lora.init_adapters(CFG, lora.LoraConfig(rank=4, alpha=8.0), jax.random.key(1))
    ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), ad)
    lc = lora.LoraConfig(rank=4, alpha=8.0, base_quantization="int8")
    qbase = quantize.quantize_base(params, "int8")
    policy = lora.attach(qbase, ad, lc)
    sp = to_sampling_params(CFG, policy, dtype=jnp.float32)
    assert isinstance(sp["layers"][0]["q_proj"], qwix.QArray) and "lora" in sp["layers"][0]
    with pytest.raises(ValueError, match="merge_lora=True on a int8 base"):
        to_sampling_params(CFG, policy, merge_lora=True)
    merged_dense = to_sampling_params(CFG, lora.merge(_dequantized(qbase), ad, lc), dtype=jnp.float32)
    # the merged dense policy is what load_policy / the export produce from a QLoRA run
    np.testing.assert_allclose(np.asarray(lora.merge_attached(policy)["layers"]["q_proj"]),
                               np.asarray(lora.merge(_dequantized(qbase), ad, lc)["layers"]["q_proj"]), atol=1e-6)
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    kw = dict(rng=jax.random.key(0), max_new_tokens=12, sampler=gen.SamplerConfig(temperature=0.0, eos_ids=(1,),
                                                                                 num_slots=2))
    a = gen.generate(CFG, sp, prompts, **kw)
    b = gen.generate(CFG, merged_dense, prompts, **kw)
    assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
    assert all(len(t) > 0 for t in a.tokens)
