"""train_step / bc on one CPU device: exact gradient accumulation, the AdamW update against optax,
non-finite skipping, single compilation, the old-log-prob pass, the KL path and the learning signal."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from masa_jax.models.qwen import forward, token_logprobs
from masa_jax.rl import bc, grpo, train_step as ts

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def assert_trees_close(a, b, rtol):
    errs = jax.tree.leaves(jax.tree.map(rel_err, a, b))
    assert max(errs) <= rtol, max(errs)


def linear_logprobs(params, tokens):
    """A stand-in model for the accumulation tests of every aggregation: log-softmax of a [V, V] table
    row per previous token; aligned like token_logprobs (0 at t = 0). Compiles in milliseconds."""
    logits = params["table"][tokens[:, :-1]]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_accumulation_is_exact_for_every_aggregation(tiny, rl_batch, cfgs, agg):
    _, _, micro = cfgs
    V = tiny.vocab_size
    params = {"table": jax.random.normal(jax.random.key(1), (V, V))}
    noise = np.random.default_rng(2).normal(0, 0.5, rl_batch["loss_mask"].shape)
    batch = dict(rl_batch, old_logprobs=np.where(rl_batch["loss_mask"], -np.log(V) + noise, 0).astype(np.float32))

    def loss_fn(params, ref_params, mb, num_tokens, num_seqs):
        return grpo.policy_loss(linear_logprobs(params, mb["tokens"]), mb["old_logprobs"], mb["advantages"],
                                mb["loss_mask"], agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)

    def plain(p):  # the whole batch at once, default normalisers
        return grpo.policy_loss(linear_logprobs(p, batch["tokens"]), batch["old_logprobs"],
                                batch["advantages"], batch["loss_mask"], agg=agg)[0]

    # Averaging micro-batch losses that use their OWN counts is not exact on ragged masks: the test
    # must be able to tell the difference.
    num_micro = len(batch["tokens"]) // micro

    def own_counts(p):
        mbs = [jax.tree.map(lambda x: x[i::num_micro], batch) for i in range(num_micro)]
        return sum(loss_fn(p, None, mb, *grpo.batch_counts(mb["loss_mask"]))[0] for mb in mbs) / num_micro

    @jax.jit
    def all_grads(p):  # one compilation for the four
        return (ts.accumulate_gradients(loss_fn, p, batch, len(batch["tokens"])),
                ts.accumulate_gradients(loss_fn, p, batch, micro), jax.grad(plain)(p), jax.grad(own_counts)(p))

    (g1, m1), (gm, mm), g_plain, g_own = all_grads(params)
    assert_trees_close(g1, g_plain, 1e-6)
    assert_trees_close(gm, g1, 1e-5)
    for key in ("loss", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "approx_kl", "ratio_mean"):
        np.testing.assert_allclose(float(mm[key]), float(m1[key]), rtol=1e-5, atol=1e-7)
    assert float(mm["ratio_max"]) == float(m1["ratio_max"])
    assert float(m1["clip_fraction_low"]) > 0 and float(m1["clip_fraction_high"]) > 0  # clipping is exercised
    assert rel_err(g_own["table"], g1["table"]) > 1e-3


def test_micro_batched_step_equals_one_batch_adamw_update(tiny, host_params, rl_batch, mesh1, cfgs, rl_step):
    """The 4-micro-batch step gives the update of optax AdamW (after global-norm clipping) on the
    gradient of the policy loss over the whole batch."""
    loss_cfg, optim_cfg, micro = cfgs

    def plain(p):
        lp = token_logprobs(tiny, p, rl_batch["tokens"], rl_batch["attention_mask"], chunk_size=loss_cfg.chunk_size)
        return grpo.policy_loss(lp, rl_batch["old_logprobs"], rl_batch["advantages"], rl_batch["loss_mask"])

    (_, m1), grads = jax.jit(jax.value_and_grad(plain, has_aux=True))(host_params)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-4  # a real gradient
    assert len(rl_batch["tokens"]) // micro == 4
    with jax.set_mesh(mesh1):
        state, m = rl_step(ts.create_train_state(tiny, host_params, optim_cfg, mesh1), rl_batch)
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm),
                     optax.adamw(optim_cfg.lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay))
    updates, (_, (adam, _, _)) = tx.update(grads, tx.init(host_params), host_params)
    # Adam's first moment is (1 - b1) * the clipped gradient: the accumulated gradient itself, to 1e-5.
    assert_trees_close(state.opt_state[1].mu, adam.mu, 1e-5)
    assert_trees_close(state.opt_state[1].nu, adam.nu, 1e-5)
    assert_trees_close(state.params, optax.apply_updates(host_params, updates), 1e-5)
    assert max(jax.tree.leaves(jax.tree.map(rel_err, state.params, host_params))) > 1e-3  # it moved
    for key in ("pg_loss", "clip_fraction", "approx_kl", "ratio_mean"):
        np.testing.assert_allclose(float(m[key]), float(m1[key]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
    assert int(state.step) == 1 and int(state.num_skipped) == 0 and float(m["skipped"]) == 0.0
    assert float(m["num_tokens"]) == rl_batch["loss_mask"].sum()
    assert float(m["num_seqs"]) == len(rl_batch["tokens"]) - 1  # the padding row is no sequence


def test_non_finite_update_is_skipped_and_step_compiles_once(tiny, host_params, rl_batch, mesh1, cfgs,
                                                             rl_step):
    _, optim_cfg, _ = cfgs
    bad = dict(rl_batch, advantages=rl_batch["advantages"].copy())
    bad["advantages"][0] = np.nan
    state = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    before = jax.device_get((state.params, state.opt_state))
    with jax.set_mesh(mesh1):
        state, m = rl_step(state, bad)
        assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
        assert int(state.step) == 0 and int(state.num_skipped) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before)
        state, m = rl_step(state, rl_batch)
        state, m = rl_step(state, rl_batch)
    assert float(m["skipped"]) == 0.0 and int(state.step) == 2 and int(state.num_skipped) == 1
    assert float(m["num_skipped"]) == 1.0
    assert rl_step.jitted._cache_size() == 1


def test_compute_logprobs(tiny, host_params, mesh1, cfgs, compute_logprobs, batch_fn):
    _, optim_cfg, _ = cfgs
    b = batch_fn(5)
    sampler = np.where(b["loss_mask"], -1.0, 0.0).astype(np.float32)
    state = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    with jax.set_mesh(mesh1):
        lp, m = compute_logprobs(state.params, dict(b, sampler_logprobs=sampler))
    logits = np.asarray(jax.jit(functools.partial(forward, tiny))(host_params, b["tokens"], b["attention_mask"]),
                        np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logsm = logits - logz[..., None]
    ref = np.zeros(b["tokens"].shape)
    ref[:, 1:] = np.take_along_axis(logsm[:, :-1], b["tokens"][:, 1:, None], -1)[..., 0]
    ref = np.where(b["loss_mask"], ref, 0.0)
    np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-5)
    mask = b["loss_mask"]
    ent = -(np.exp(logsm) * logsm).sum(-1)
    ent_ref = np.zeros_like(ent)
    ent_ref[:, 1:] = ent[:, :-1]  # entropy of the distribution token t was drawn from
    np.testing.assert_allclose(float(m["entropy"]), ent_ref[mask].mean(), rtol=1e-5)
    gap = np.abs(ref - sampler)[mask]
    np.testing.assert_allclose(float(m["logprob_gap_mean"]), gap.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["logprob_gap_max"]), gap.max(), rtol=1e-5)


def test_learning_signal(tiny, host_params, mesh1, cfgs, rl_step, compute_logprobs, batch_fn):
    """+1 advantage on sequence 0 and -1 on sequence 1: their log-likelihoods move apart."""
    _, optim_cfg, _ = cfgs
    b = batch_fn(2)
    b["loss_mask"][2:] = False     # only the two sequences under test carry loss
    b["advantages"][:] = 0.0
    b["advantages"][:2] = [1.0, -1.0]
    state = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    seq_logp = lambda lp: np.asarray(lp)[:2].sum(-1)
    with jax.set_mesh(mesh1):
        lp0, _ = compute_logprobs(state.params, b)
        lp = lp0
        for _ in range(4):
            state, m = rl_step(state, dict(b, old_logprobs=lp))   # old log-probs recomputed each update
            lp, _ = compute_logprobs(state.params, b)
    up, down = seq_logp(lp) - seq_logp(lp0)
    assert up > 0.5 and down < -0.5, (up, down)
    assert int(state.step) == 4 and float(m["skipped"]) == 0.0
    assert rl_step.jitted._cache_size() == 1  # NumPy batches and device old_logprobs: one compilation


def test_bc_step_lowers_cross_entropy(tiny, host_params, mesh1, cfgs, bc_step, bc_lr, compute_logprobs, batch_fn):
    _, optim_cfg, _ = cfgs
    b = batch_fn(3)
    b = {k: b[k] for k in ("tokens", "attention_mask", "loss_mask")}
    ce = lambda lp: -np.asarray(lp)[b["loss_mask"]].mean()
    state = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    with jax.set_mesh(mesh1):
        ce0 = ce(compute_logprobs(state.params, b)[0])
        state, m = bc_step(state, b)
        ce1 = ce(compute_logprobs(state.params, b)[0])
        for _ in range(3):
            state, m = bc_step(state, b)
        ce4 = ce(compute_logprobs(state.params, b)[0])
    assert ce1 < ce0 and ce4 < ce1 - 0.05, (ce0, ce1, ce4)
    assert int(state.step) == 0  # BC leaves the RL warm-up counter alone
    assert float(m["lr"]) == pytest.approx(bc_lr)
    # The loss reported by the step is the cross-entropy before its update.
    state2 = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    with jax.set_mesh(mesh1):
        _, m0 = bc_step(state2, b)
    np.testing.assert_allclose(float(m0["bc_loss"]), ce0, rtol=1e-5)


def test_bc_loss_formula():
    logp = -np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    mask = np.array([[0, 1, 1], [0, 0, 1]], bool)
    loss, m = bc.bc_loss(jnp.asarray(logp), jnp.asarray(mask))
    assert float(loss) == pytest.approx((2 + 3 + 6) / 3)
    assert float(bc.bc_loss(jnp.asarray(logp), jnp.asarray(mask), num_tokens=jnp.float32(11.0))[0]) == 1.0


def test_kl_term_and_reference_policy(tiny, host_params, rl_batch, compute_logprobs, mesh1):
    cfg = ts.LossConfig(chunk_size=8, kl_coef=0.1, kl_estimator="k3")
    ref = jax.tree.map(lambda x: x + 0.02 * np.sign(x), host_params)
    nt, ns = grpo.batch_counts(rl_batch["loss_mask"])
    loss, m = jax.jit(functools.partial(ts.rl_loss, tiny, cfg))(host_params, ref, rl_batch, nt, ns)
    with jax.set_mesh(mesh1):
        lp, _ = compute_logprobs(host_params, rl_batch)
        ref_lp, _ = compute_logprobs(ref, rl_batch)
    d = np.asarray(ref_lp, np.float64) - np.asarray(lp)
    kl = (np.exp(d) - 1 - d)[rl_batch["loss_mask"]].mean()
    assert kl > 1e-4
    np.testing.assert_allclose(float(m["kl_loss"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(m["pg_loss"]) + 0.1 * kl, rtol=1e-5)

    # kl_coef = 0: no reference forward is traced (one forward scan fewer than with the KL term).
    count_scans = lambda c: str(jax.make_jaxpr(functools.partial(ts.rl_loss, tiny, c))(
        host_params, None if c.kl_coef == 0 else ref, rl_batch, nt, ns)).count("scan[")
    assert count_scans(ts.LossConfig(chunk_size=8)) < count_scans(cfg)


def test_train_state_reference_params(tiny, host_params, mesh1, cfgs):
    _, optim_cfg, _ = cfgs
    assert ts.create_train_state(tiny, host_params, optim_cfg, mesh1).ref_params is None
    bf16 = tiny.replace(dtype="bfloat16")
    state = ts.create_train_state(bf16, host_params, optim_cfg, mesh1, keep_reference=True)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.ref_params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    state32 = ts.create_train_state(tiny, host_params, optim_cfg, mesh1, keep_reference=True)
    ptrs = lambda t: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(t)}
    assert not ptrs(state32.params) & ptrs(state32.ref_params)  # donation cannot take the reference


def test_learning_rate_schedule():
    cfg = ts.OptimConfig(lr=1e-6, warmup_steps=20)
    lrs = [float(ts.learning_rate(cfg, s)) for s in (0, 9, 19, 100)]
    np.testing.assert_allclose(lrs, [5e-8, 5e-7, 1e-6, 1e-6], rtol=1e-6)
    assert float(ts.learning_rate(ts.OptimConfig(lr=2e-6, warmup_steps=0), 0)) == pytest.approx(2e-6)


def test_microbatch_split_and_padding():
    x = np.arange(12 * 3).reshape(12, 3)
    split = ts.split_microbatches({"x": jnp.asarray(x)}, 4)["x"]
    assert split.shape == (4, 3, 3)
    np.testing.assert_array_equal(split[1], x[[1, 5, 9]])  # strided: spread over data-parallel shards
    np.testing.assert_array_equal(ts.merge_microbatches(split), x)
    b = {"tokens": np.ones((5, 4), np.int32), "loss_mask": np.ones((5, 4), bool), "advantages": np.ones(5)}
    p = ts.pad_batch(b, 4)
    assert p["tokens"].shape == (8, 4) and not p["loss_mask"][5:].any() and p["advantages"][5:].sum() == 0
    assert ts.pad_batch(b, 5)["tokens"].shape == (5, 4)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        ts.accumulate_gradients(None, None, {"tokens": np.zeros((5, 2)), "loss_mask": np.zeros((5, 2))}, 2)


def _eqns(jaxpr):
    """Every equation of a jaxpr, recursing into scan / remat / pjit bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _eqns(sub.jaxpr)


def test_mixed_precision_layout(tiny, host_params, rl_batch, mesh1, cfgs):
    """bf16 compute: the layer matmuls run in bfloat16 under full remat, while log-probs, loss,
    gradients, master params and Adam state stay float32 (checked on the traced program, no compile)."""
    loss_cfg, optim_cfg, micro = cfgs
    bf16 = tiny.replace(dtype="bfloat16", remat="full")
    nt, ns = grpo.batch_counts(rl_batch["loss_mask"])
    grad_fn = jax.value_and_grad(lambda p: ts.rl_loss(bf16, loss_cfg, p, None, rl_batch, nt, ns), has_aux=True)
    eqns = list(_eqns(jax.make_jaxpr(grad_fn)(host_params).jaxpr))
    dot_dtypes = {tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if e.primitive.name == "dot_general"}
    assert ("bfloat16", "bfloat16") in dot_dtypes and ("float32", "float32") not in dot_dtypes, dot_dtypes
    # Full remat adds the per-layer checkpoint (to the log-prob chunk's one, which this batch's small
    # logits do not need: logprobs.REMAT_LOGITS_BYTES).
    f32_grad_fn = jax.value_and_grad(lambda p: ts.rl_loss(tiny, loss_cfg, p, None, rl_batch, nt, ns), has_aux=True)
    n_remat = lambda es: sum(e.primitive.name.startswith("remat") for e in es)
    assert n_remat(eqns) > n_remat(_eqns(jax.make_jaxpr(f32_grad_fn)(host_params).jaxpr)) >= 0
    (loss, _), grads = jax.eval_shape(grad_fn, host_params)
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    state = ts.create_train_state(bf16, host_params, optim_cfg, mesh1)
    out_state, _ = jax.eval_shape(ts.make_train_step(bf16, loss_cfg, optim_cfg, mesh1, micro).jitted, state,
                                  jax.device_put(rl_batch, ts.batch_sharding(mesh1)), np.asarray(True))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((out_state.params, out_state.opt_state)) if x.ndim)
