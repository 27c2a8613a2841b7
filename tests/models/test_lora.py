"""LoRA (models/qwen/lora.py): merged = unmerged forward, the adapter gradients are the dense gradient
pushed through the chain rule, the train step moves only the adapters, the sampler's merged and unmerged
layouts decode the same tokens, and the PEFT export loads in `peft` with the merged export's logits."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax.models import qwen
from masa_jax.models.qwen import lora
from masa_jax.models.qwen.logprobs import token_logprobs

CFG = qwen.ModelConfig(family="qwen3", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                       max_position_embeddings=128, eos_token_id=1)
LCFG = lora.LoraConfig(rank=3, alpha=6.0)  # scale 2: a forgotten scale shows


def _nonzero_adapters(cfg, lcfg, seed=1, b_std=0.05):
    """Fresh adapters with B moved off zero (a fresh B = 0 would make every check trivial)."""
    ad = lora.init_adapters(cfg, lcfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [x + b_std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _batch(B=3, T=12, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[0, :4] = False  # a left-padded row
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_fresh_adapters_leave_the_model_unchanged_and_have_peft_shapes():
    params = qwen.init_params(CFG, jax.random.key(0))
    ad = lora.init_adapters(CFG, LCFG, jax.random.key(1))
    tokens, mask = _batch()
    # B = 0: the adapter branch adds exact zeros, but XLA may tile x @ W differently in the two programs
    # (CI saw 1-ulp differences), so compare to float32 rounding, far below what a non-zero branch adds.
    np.testing.assert_allclose(qwen.forward(CFG, lora.attach(params, ad, LCFG), tokens, mask),
                               qwen.forward(CFG, params, tokens, mask), atol=1e-6, rtol=0)
    assert ad["layers"]["q_proj"]["a"].shape == (2, 32, 3) and ad["layers"]["q_proj"]["b"].shape == (2, 3, 4, 8)
    assert ad["layers"]["o_proj"]["a"].shape == (2, 4, 8, 3) and ad["layers"]["o_proj"]["b"].shape == (2, 3, 32)
    bound = 1 / np.sqrt(32)  # PEFT's kaiming-uniform(a=sqrt(5)) bound for fan_in = hidden
    a = np.asarray(ad["layers"]["gate_proj"]["a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert lora.num_adapter_params(CFG, LCFG) == sum(x.size for x in jax.tree.leaves(ad))


def test_merged_forward_equals_unmerged_forward_in_float32():
    params = qwen.init_params(CFG, jax.random.key(0))
    ad = _nonzero_adapters(CFG, LCFG)
    tokens, mask = _batch()
    unmerged = np.asarray(qwen.forward(CFG, lora.attach(params, ad, LCFG), tokens, mask))
    merged = np.asarray(qwen.forward(CFG, lora.merge(params, ad, LCFG), tokens, mask))
    base = np.asarray(qwen.forward(CFG, params, tokens, mask))
    np.testing.assert_allclose(unmerged, merged, atol=2e-6, rtol=0)
    assert np.abs(unmerged - base).max() > 0.05  # the adapters do change the logits
    # The merged weight is exactly W + scale * A @ B (one layer, one target, by hand).
    w = np.asarray(params["layers"]["down_proj"][1], np.float64)
    a, b = (np.asarray(ad["layers"]["down_proj"][k][1], np.float64) for k in ("a", "b"))
    np.testing.assert_allclose(np.asarray(lora.merge(params, ad, LCFG)["layers"]["down_proj"][1]),
                               w + 2.0 * a @ b, atol=1e-6)


def _loss(cfg, params, tokens, mask):
    lp = token_logprobs(cfg, params, tokens, mask, chunk_size=8)
    return -jnp.sum(lp * mask) / jnp.sum(mask)


def test_adapter_gradients_are_the_dense_gradient_through_the_chain_rule():
    """dL/dA = scale dL/dW B^T and dL/dB = scale A^T dL/dW, with dL/dW the dense gradient at W' = W +
    scale A B, for every target (input / output dims flattened to matrices), by hand."""
    params = qwen.init_params(CFG, jax.random.key(0))
    ad = _nonzero_adapters(CFG, LCFG)
    tokens, mask = _batch()
    g_lora = jax.grad(lambda a: _loss(CFG, lora.attach(params, a, LCFG), tokens, mask))(ad)
    g_dense = jax.grad(lambda p: _loss(CFG, p, tokens, mask))(lora.merge(params, ad, LCFG))
    s = LCFG.scale
    for name in lora.TARGETS:
        for layer in range(CFG.num_layers):
            a = np.asarray(ad["layers"][name]["a"][layer], np.float64)
            b = np.asarray(ad["layers"][name]["b"][layer], np.float64)
            gw = np.asarray(g_dense["layers"][name][layer], np.float64)
            r = a.shape[-1]
            A, Bm, GW = a.reshape(-1, r), b.reshape(r, -1), gw.reshape(a.reshape(-1, r).shape[0], -1)
            want_a, want_b = s * GW @ Bm.T, s * A.T @ GW
            got_a = np.asarray(g_lora["layers"][name]["a"][layer]).reshape(want_a.shape)
            got_b = np.asarray(g_lora["layers"][name]["b"][layer]).reshape(want_b.shape)
            scale_a, scale_b = np.abs(want_a).max(), np.abs(want_b).max()
            assert scale_a > 1e-5 and scale_b > 1e-5, (name, layer)
            np.testing.assert_allclose(got_a, want_a, atol=2e-4 * scale_a, rtol=0, err_msg=name)
            np.testing.assert_allclose(got_b, want_b, atol=2e-4 * scale_b, rtol=0, err_msg=name)


def test_the_lora_train_step_moves_only_the_adapters_by_the_chain_rule_gradient():
    """One RL step (make_train_step with lora_cfg): the base is bit-identical afterwards, the optimizer
    state has the adapters' shapes only, and the step's gradient norm is the norm of the chain-rule
    gradient computed from the dense gradient above."""
    from masa_jax.parallel import mesh as mesh_lib
    from masa_jax.rl import grpo
    from masa_jax.rl import train_step as ts

    params = qwen.init_params(CFG, jax.random.key(0))
    mesh = mesh_lib.make_mesh((1, -1, 1))
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    loss_cfg = ts.LossConfig(kl_coef=0.0, chunk_size=8)
    optim = ts.OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=1e9)
    state = ts.create_train_state(CFG, params, optim, mesh, lora_cfg=lcfg, lora_rng=jax.random.key(3))
    # B != 0 so dL/dA is not zero either
    state = state.replace(params=jax.device_put(_nonzero_adapters(CFG, lcfg, seed=5), ts.adapter_shardings(CFG, lcfg, mesh)))
    adapters0 = jax.device_get(state.params)
    tokens, mask = _batch(B=4)
    loss_mask = np.asarray(mask).copy()
    loss_mask[:, :6] = False
    adv = np.array([1.0, -0.5, 0.25, -1.0], np.float32)
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": jnp.asarray(loss_mask),
             "advantages": jnp.asarray(adv)}
    logp_fn = ts.make_compute_logprobs(CFG, mesh, 2, chunk_size=8, lora_cfg=lcfg)
    old, _ = logp_fn(ts.policy_params(state, lcfg), batch)
    batch["old_logprobs"] = old
    step = ts.make_train_step(CFG, loss_cfg, optim, mesh, 2, lora_cfg=lcfg)
    base_before = jax.device_get(state.base_params)

    # By hand: the dense gradient of the same loss at W', pushed through the chain rule.
    num_tokens, num_seqs = grpo.batch_counts(jnp.asarray(loss_mask))

    def dense_loss(p):
        lp = token_logprobs(CFG, p, tokens, mask, chunk_size=8)
        return grpo.policy_loss(lp, old, jnp.asarray(adv), jnp.asarray(loss_mask), loss_cfg.clip_low,
                                loss_cfg.clip_high, loss_cfg.clip_c, loss_cfg.loss_agg, num_tokens=num_tokens,
                                num_seqs=num_seqs)[0]

    g_dense = jax.grad(dense_loss)(lora.merge(base_before, adapters0, lcfg))
    sq = 0.0
    for name in lcfg.targets:
        for layer in range(CFG.num_layers):
            a = np.asarray(adapters0["layers"][name]["a"][layer], np.float64)
            b = np.asarray(adapters0["layers"][name]["b"][layer], np.float64)
            r = a.shape[-1]
            gw = np.asarray(g_dense["layers"][name][layer], np.float64).reshape(a.reshape(-1, r).shape[0], -1)
            sq += np.sum((lcfg.scale * gw @ b.reshape(r, -1).T) ** 2) + np.sum((lcfg.scale * a.reshape(-1, r).T @ gw) ** 2)

    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sq), rtol=2e-4)
    for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(new_state.base_params))):
        np.testing.assert_array_equal(x, y)
    moved = [np.abs(np.asarray(x) - y).max() for x, y in zip(jax.tree.leaves(jax.device_get(new_state.params)),
                                                             jax.tree.leaves(adapters0))]
    assert min(moved) > 0
    opt_shapes = {x.shape for x in jax.tree.leaves(new_state.opt_state) if x.ndim > 0}
    assert opt_shapes == {x.shape for x in jax.tree.leaves(adapters0)}
    assert new_state.ref_params is None


def test_sampler_decodes_the_same_greedy_tokens_from_merged_and_unmerged_weights():
    import importlib

    from masa_jax.sampling.reshard import to_sampling_params

    params = qwen.init_params(CFG, jax.random.key(0), std=0.2)
    ad = _nonzero_adapters(CFG, LCFG, b_std=0.3)
    policy = lora.attach(params, ad, LCFG)
    merged_sp = to_sampling_params(CFG, policy)
    unmerged_sp = to_sampling_params(CFG, policy, merge_lora=False)
    assert "lora" not in merged_sp["layers"][0] and "lora" in unmerged_sp["layers"][0]
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    gen = importlib.import_module("masa_jax.sampling.generate")
    sampler = gen.SamplerConfig(temperature=0.0, eos_ids=(1,), num_slots=4)
    out_m = gen.generate(CFG, merged_sp, prompts, rng=jax.random.key(0), max_new_tokens=12, sampler=sampler)
    out_u = gen.generate(CFG, unmerged_sp, prompts, rng=jax.random.key(0), max_new_tokens=12, sampler=sampler)
    out_base = gen.generate(CFG, to_sampling_params(CFG, params), prompts, rng=jax.random.key(0), max_new_tokens=12,
                            sampler=sampler)
    assert [list(t) for t in out_m.tokens] == [list(t) for t in out_u.tokens]
    assert [list(t) for t in out_m.tokens] != [list(t) for t in out_base.tokens]


def test_peft_adapter_state_dict_round_trips_with_peft_names():
    ad = _nonzero_adapters(CFG, LCFG)
    sd = lora.peft_state_dict(CFG, ad)
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 32)
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 3)
    assert sd["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (3, 32)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (3, 48)
    assert len(sd) == 2 * len(lora.TARGETS) * CFG.num_layers
    back = lora.adapters_from_peft_state_dict(CFG, LCFG, sd)
    for x, y in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_export_loads_in_peft_with_the_merged_exports_logits(hf_models, tmp_path, hf_logits_fn, padded_batch):
    """save_pretrained of a LoRA policy: transformers loads the merged directory, peft loads the adapter
    on the base directory, and both give our JAX logits."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    _, base_dir = hf_models["qwen3_untied"]
    cfg, params = qwen.from_pretrained(base_dir)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"))
    ad = _nonzero_adapters(cfg, lcfg, b_std=0.1)
    out = tmp_path / "export"
    lora.save_pretrained(cfg, lcfg, params, ad, out, base_model_path=str(base_dir))
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert not (out / "adapter_config.json").exists()  # transformers would apply it on top of merged weights

    tokens, mask = padded_batch([9, 6], T=9, vocab=cfg.vocab_size)
    ours = np.asarray(qwen.forward(cfg, lora.attach(params, ad, lcfg), jnp.asarray(tokens), jnp.asarray(mask)))
    merged_hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    base_hf = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base_hf, out / "adapter").eval()
    logits_merged = hf_logits_fn(merged_hf, tokens, mask)
    logits_peft = hf_logits_fn(with_adapter, tokens, mask)
    base_logits = hf_logits_fn(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval(),
                               tokens, mask)
    real = mask.astype(bool)
    assert np.abs(logits_peft - base_logits)[real].max() > 0.05  # the adapter was applied
    np.testing.assert_allclose(logits_peft[real], logits_merged[real], atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours[real], logits_peft[real], atol=2e-5, rtol=0)
