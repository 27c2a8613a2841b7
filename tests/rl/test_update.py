"""Updater.policy_update: verl's PPO mini-batching (rl.mini_batch_size problems per update, rl.ppo_epochs
passes, old log-probs once per step), its metrics, and the clip fractions by hand."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax import components
from masa_jax.config import base_config
from masa_jax.rl import batching, grpo, train_step as ts, update
from masa_jax.rl.sequences import TrainingSequences

P, G, M = 4, 2, 2  # problems, solution and meta rollouts per problem: 16 sequences, 4 per problem
CLIP_KEYS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "clip_fraction_dual")


@pytest.fixture(scope="module")
def config():
    c = base_config()
    c.rl.lr = 0.1           # huge steps (0.025 at step 0): the second mini-batch's ratios leave the clip range
    c.rl.warmup_steps = 4   # lr depends on state.step: every update of a step must see the same one
    c.rl.micro_batch_size = 4
    c.rl.chunk_size = 16
    c.data.max_prompt_length = 16
    c.rollout.max_response_length = 16
    c.rollout.meta_max_new_tokens = 16
    return c


@pytest.fixture(scope="module")
def updater(config, tiny, host_params, mesh1):
    return update.Updater.create(components.updater_config(config), tiny, host_params, mesh1, pad_id=0)


@pytest.fixture(scope="module")
def updater_rows(config, tiny, host_params, mesh1):
    c = config.copy_and_resolve_references()
    c.rl.prefix_sharing = False
    return update.Updater.create(components.updater_config(c), tiny, host_params, mesh1, pad_id=0)


@pytest.fixture
def fresh_state(config, tiny, host_params, mesh1):
    return lambda: ts.create_train_state(tiny, host_params, components.optim_config(config), mesh1)


def fake_rollouts(seed: int = 0, shared_prompts: bool = True):
    """Solution rollouts of every problem, then meta rollouts (the Rollouts order); each prompt starts
    with token 1 + its problem index, so a mini-batch's problems can be read off its tokens. The rollouts
    of one problem and path share their prompt (as in a run), or with shared_prompts=False each has its own."""
    rng = np.random.default_rng(seed)
    prompts, responses, logps, adv, problem = [], [], [], [], []
    for kind, n in ((0, G), (1, M)):
        for p in range(P):
            prompt = [1 + p] + rng.integers(10, 64, int(rng.integers(30, 60))).tolist()
            for i in range(n):
                if not shared_prompts:
                    prompt = [1 + p] + rng.integers(10, 64, int(rng.integers(30, 60))).tolist()
                prompts.append(prompt)
                responses.append(rng.integers(10, 64, int(rng.integers(3, 12))).tolist())
                logps.append(-rng.random(len(responses[-1])).astype(np.float32))
                adv.append(1.0 if (i + p + kind) % 2 else -1.0)  # both signs in every group
                problem.append(p)
    return TrainingSequences(prompts, responses, logps, np.asarray(adv, np.float32),
                             np.repeat([0, 1], [P * G, P * M]).astype(np.int32), np.asarray(problem))


class Spy:
    """Wraps the updater's train step; records each call's problems, advance flag and metrics."""

    def __init__(self, step):
        self.step, self.calls = step, []

    def __call__(self, state, batch, advance=True):
        state, m = self.step(state, batch, advance)
        self.calls.append(dict(problems=problems_of(batch), advance=advance, metrics=jax.device_get(m)))
        return state, m


def problems_of(batch) -> np.ndarray:
    """The problem of every real row of a packed batch (either layout), read off its prompt's first token."""
    if batching.is_shared(batch):
        prefixes, index = np.asarray(batch["prefix_tokens"]), np.asarray(batch["prefix_index"])
        real = np.asarray(batch["attention_mask"]).any(axis=-1)              # [Bk, n]
        first = np.take_along_axis(prefixes[:, :, 0], index, axis=1)         # [Bk, n]
        return first[real] - 1
    tokens, attn = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
    return tokens[attn[:, 0], 0] - 1


def spied(updater, **fields):
    up = dataclasses.replace(updater, **fields)
    up.train_step = Spy(updater.train_step)
    return up


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


# ------------------------------------------------------------------------------------ mini-batching


@pytest.mark.parametrize("mini_batch_size", [0, P, 100])
def test_one_minibatch_is_the_plain_step(updater, fresh_state, mini_batch_size):
    """mini_batch_size 0 or >= the step's problems, 1 epoch: bit-identical to one train step on the whole
    batch with old log-probs from the same params (the behaviour before mini-batching)."""
    ro = fake_rollouts()
    up = dataclasses.replace(updater, mini_batch_size=mini_batch_size, ppo_epochs=1)
    state, m = up.policy_update(fresh_state(), ro)

    ref = fresh_state()
    assert up.prefix_sharing  # the default
    local, _ = up.pack_shared(ro, sampler_logprobs=ro.sampler_logprobs)
    batch = up.to_global(local)
    old, _ = up.compute_logprobs(ref.params, batch)
    batch = {k: v for k, v in batch.items() if k != "sampler_logprobs"}
    ref, m_ref = up.train_step(ref, dict(batch, old_logprobs=old))

    assert_trees_equal((state.params, state.opt_state, state.step), (ref.params, ref.opt_state, ref.step))
    assert m["actor/num_updates"] == 1.0 and m["actor/num_minibatches"] == 1.0
    assert m["actor/loss"] == float(m_ref["loss"]) and m["actor/grad_norm"] == float(m_ref["grad_norm"])
    # One update from freshly recomputed old log-probs is on-policy: ratio 1, nothing clips.
    assert abs(m["actor/ppo_kl"]) < 1e-6 and all(m[f"actor/{k}"] == 0.0 for k in CLIP_KEYS)
    assert m["actor/entropy"] > 0  # from the old-log-prob pass (verl's actor/entropy)


def test_two_minibatches_second_update_is_off_policy(updater, fresh_state):
    ro = fake_rollouts()
    up = spied(updater, mini_batch_size=2, ppo_epochs=1)
    state, m = up.policy_update(fresh_state(), ro)
    first, second = [c["metrics"] for c in up.train_step.calls]
    # Update 1 is on-policy (plain REINFORCE with the group baseline) ...
    assert abs(float(first["ppo_kl"])) < 1e-6 and float(first["ratio_max"]) - float(first["ratio_min"]) < 1e-5
    assert all(float(first[k]) == 0.0 for k in CLIP_KEYS)
    # ... update 2 scores its problems with params that update 1 moved: ratio != 1, and clipping acts.
    assert abs(float(second["ppo_kl"])) > 1e-3 and abs(float(second["ratio_mean"]) - 1) > 1e-3
    assert float(second["clip_fraction"]) > 0
    assert float(second["clip_fraction_low"]) > 0 and float(second["clip_fraction_high"]) > 0
    # The step's metrics average its updates.
    assert m["actor/num_updates"] == 2.0 and m["actor/num_minibatches"] == 2.0
    for k in CLIP_KEYS + ("ppo_kl", "loss"):
        assert m[f"actor/{k}"] == pytest.approx((float(first[k]) + float(second[k])) / 2)
    assert m["actor/ratio_max"] == max(float(first["ratio_max"]), float(second["ratio_max"]))
    # Each mini-batch holds all 4 sequences of 2 whole problems, and is normalised by its own tokens.
    calls = up.train_step.calls
    assert sorted(np.concatenate([c["problems"] for c in calls]).tolist()) == sorted(ro.problem.tolist())
    for c in calls:
        assert len(set(c["problems"].tolist())) == 2 and len(c["problems"]) == 2 * (G + M)
    tokens = sum(len(r) for r in ro.response_ids)
    assert float(first["num_tokens"]) + float(second["num_tokens"]) == tokens
    # The RL step counts once, so both updates ran at the same warm-up learning rate.
    assert [c["advance"] for c in calls] == [False, True] and int(state.step) == 1
    assert float(first["lr"]) == float(second["lr"])


def test_epochs_times_minibatches_updates(updater, fresh_state):
    ro = fake_rollouts()
    up = spied(updater, mini_batch_size=2, ppo_epochs=3)
    state, m = up.policy_update(fresh_state(), ro)
    calls = up.train_step.calls
    assert len(calls) == 6 and m["actor/num_updates"] == 6.0 and m["actor/num_minibatches"] == 2.0
    assert [c["advance"] for c in calls] == [False] * 5 + [True] and int(state.step) == 1
    for epoch in range(3):  # every epoch sees every sequence once
        seen = np.concatenate([c["problems"] for c in calls[2 * epoch:2 * epoch + 2]])
        assert sorted(seen.tolist()) == sorted(ro.problem.tolist())
    lrs = {float(c["metrics"]["lr"]) for c in calls}
    assert len(lrs) == 1
    # The next step's updates use the next warm-up learning rate.
    up.train_step.calls.clear()
    state, _ = up.policy_update(state, fake_rollouts(1))
    assert float(up.train_step.calls[0]["metrics"]["lr"]) == pytest.approx(2 * lrs.pop()) and int(state.step) == 2


def test_same_step_same_shuffle_same_params(updater, fresh_state):
    """The shuffle is seeded by (seed, state.step): rerunning a step (a resumed run) is bit-exact."""
    ro = fake_rollouts()
    runs = []
    for _ in range(2):
        up = spied(updater, mini_batch_size=1, ppo_epochs=2)
        state, _ = up.policy_update(fresh_state(), ro)
        runs.append((state, [c["problems"].tolist() for c in up.train_step.calls]))
    assert runs[0][1] == runs[1][1]
    assert_trees_equal(runs[0][0].params, runs[1][0].params)
    assert runs[0][1][:P] != runs[0][1][P:]  # the second epoch is a new shuffle of the 4 problems


@pytest.mark.parametrize("mini_batch_size", [0, 2])
def test_prefix_sharing_on_and_off_give_the_same_update(updater, updater_rows, fresh_state, mini_batch_size):
    """rl.prefix_sharing changes how the batch is laid out and computed, not the update: the same
    mini-batches (same shuffle), losses, gradient norms and params within float32 rounding, with fewer
    tokens through the forward."""
    ro = fake_rollouts(2)
    out = {}
    for name, base in (("shared", updater), ("rows", updater_rows)):
        up = spied(base, mini_batch_size=mini_batch_size, ppo_epochs=1)
        state, m = up.policy_update(fresh_state(), ro)
        out[name] = (jax.device_get(state.params), m, [sorted(c["problems"].tolist()) for c in up.train_step.calls])
    (p_s, m_s, calls_s), (p_r, m_r, calls_r) = out["shared"], out["rows"]
    assert calls_s == calls_r and len(calls_s) == (1 if mini_batch_size == 0 else 2)
    for k in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl", "actor/clip_fraction"):
        assert m_s[k] == pytest.approx(m_r[k], rel=1e-4, abs=1e-7), k
    assert m_s["actor/num_tokens"] == m_r["actor/num_tokens"] and m_s["actor/batch_rows"] == m_r["actor/batch_rows"]
    assert m_s["actor/forward_tokens"] < m_r["actor/forward_tokens"]
    assert m_s["actor/prefix_shared"] == 1.0 and m_r["actor/prefix_shared"] == 0.0
    # One update: rounding-level. Two: the second Adam step (lr 0.025, near sign-like) divides rounding
    # differences in near-zero gradients by their own tiny second moments: the row layout with micro-batch
    # 8 instead of 4 (only the summation order changes) already moves these params 0.7 % of the step
    # apart (measured 2026-12-04), so two updates are compared at 2 %.
    tol = 1e-4 if mini_batch_size == 0 else 2e-2
    p0 = jax.device_get(fresh_state().params)
    for a, b, c in zip(jax.tree.leaves(p_s), jax.tree.leaves(p_r), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a - c, b - c, atol=tol * float(np.max(np.abs(b - c))) + 1e-7)


def test_rows_that_share_no_prompt_keep_the_row_layout(updater, updater_rows, fresh_state):
    ro = fake_rollouts(3, shared_prompts=False)
    _, m = updater.policy_update(fresh_state(), ro)
    _, m_rows = updater_rows.policy_update(fresh_state(), ro)
    assert m["actor/prefix_shared"] == 0.0
    assert m["actor/loss"] == m_rows["actor/loss"] and m["actor/forward_tokens"] == m_rows["actor/forward_tokens"]


def test_empty_step_changes_nothing(updater, fresh_state):
    empty = TrainingSequences.empty()
    state = fresh_state()
    state2, m = updater.policy_update(state, empty)
    assert m == {"actor/empty_batch": 1.0} and state2 is state


def test_num_minibatches():
    assert update.num_minibatches(128, 32) == 4      # the paper's step with verl's DAPO mini-batch
    assert update.num_minibatches(128, 0) == 1       # 0: the whole step
    assert update.num_minibatches(8, 32) == 1
    assert update.num_minibatches(10, 4) == 3        # at most 4 problems each: 4, 3, 3


def test_shuffled_minibatches_whole_problems_deterministic_per_step():
    problem_of_row = np.concatenate([np.repeat(np.arange(16), 3), np.repeat(np.arange(16), 2)])  # sol, meta
    chunks = lambda step: update.shuffled_minibatches(problem_of_row, 4, np.random.default_rng([0, step]))
    a = chunks(5)
    assert all(np.array_equal(x, y) for x, y in zip(a, chunks(5)))           # same (seed, step): same
    assert not all(np.array_equal(x, y) for x, y in zip(a, chunks(6)))       # next step: reshuffled
    assert sorted(np.concatenate(a).tolist()) == list(range(len(problem_of_row)))  # every row once
    for rows in a:
        probs = np.unique(problem_of_row[rows])
        assert len(probs) == 4 and len(rows) == 4 * 5  # 4 whole problems (all 5 of their rows)
    rng = np.random.default_rng([0, 5])
    e1, e2 = (update.shuffled_minibatches(problem_of_row, 4, rng) for _ in range(2))
    assert not all(np.array_equal(x, y) for x, y in zip(e1, e2))             # epochs reshuffle
    sizes = [len(np.unique(problem_of_row[r])) for r in update.shuffled_minibatches(problem_of_row, 3, rng)]
    assert sizes == [6, 5, 5]
    # Fewer problems than mini-batches (an unbalanced host): trailing chunks are empty.
    assert [len(r) for r in update.shuffled_minibatches(np.array([0, 0, 1]), 3, rng)][2] == 0


def test_take_rows_pads_and_trims():
    local = {"tokens": np.arange(4 * 128).reshape(4, 128).astype(np.int32),
             "attention_mask": np.zeros((4, 128), bool), "advantages": np.arange(4, dtype=np.float32)}
    local["attention_mask"][0, :70] = True
    local["attention_mask"][2, :20] = True
    out = update.take_rows(local, np.array([2]), 4, (64, 128))
    assert out["tokens"].shape == (4, 64) and out["advantages"].tolist() == [2, 0, 0, 0]
    np.testing.assert_array_equal(out["tokens"][0], local["tokens"][2, :64])
    assert not out["attention_mask"][1:].any()
    assert update.take_rows(local, np.array([0, 2]), 4, (64, 128))["tokens"].shape == (4, 128)
    empty = update.take_rows(local, np.zeros(0, int), 4, (64, 128))  # a host with no problem in it
    assert empty["tokens"].shape == (4, 64) and not empty["attention_mask"].any()


def test_advance_flag_one_compilation(tiny, host_params, mesh1, cfgs, rl_batch):
    loss_cfg, optim_cfg, micro = cfgs
    step = ts.make_train_step(tiny, loss_cfg, optim_cfg, mesh1, micro)
    state = ts.create_train_state(tiny, host_params, optim_cfg, mesh1)
    state, m = step(state, rl_batch, False)
    assert int(state.step) == 0 and float(m["skipped"]) == 0.0  # applied, but not counted
    state, _ = step(state, rl_batch)
    assert int(state.step) == 1 and step.jitted._cache_size() == 1


# ------------------------------------------------------------------------------------ clip fractions


def test_clip_fractions_by_hand():
    """One token per clip region, against hand-computed values and verl's definitions
    (pg_clipfrac: the clipped branch is taken; pg_clipfrac_lower: the dual clip is active)."""
    ratio = np.array([[1.5, 0.5, 0.5, 20.0, 1.5, 1.0, 50.0]])
    adv = np.array([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0]], np.float32)
    mask = np.array([[True] * 6 + [False]])  # the last token is off the mask
    logp, old = np.log(ratio).astype(np.float32), np.zeros(ratio.shape, np.float32)
    loss, m = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                               clip_low=0.2, clip_high=0.28, clip_c=10.0)
    # Per token: high clip (-1.28), unclipped (-0.5), low clip (0.8), dual clip (10), unclipped (1.5, -1).
    assert float(loss) == pytest.approx((-1.28 - 0.5 + 0.8 + 10.0 + 1.5 - 1.0) / 6, rel=1e-6)
    assert float(m["clip_fraction_high"]) == pytest.approx(1 / 6)
    assert float(m["clip_fraction_low"]) == pytest.approx(1 / 6)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(m["clip_fraction_dual"]) == pytest.approx(1 / 6)
    assert float(m["ppo_kl"]) == pytest.approx(-np.log(ratio[0, :6]).mean(), rel=1e-5)
    # verl (core_algos.compute_policy_loss) on the same tokens.
    r, a = ratio[mask], adv[mask]
    pg1, pg2, pg3 = -a * r, -a * np.clip(r, 0.8, 1.28), -a * 10.0
    clip1 = np.maximum(pg1, pg2)
    assert float(m["clip_fraction"]) == pytest.approx(np.mean(pg2 > pg1))
    assert float(m["clip_fraction_dual"]) == pytest.approx(np.mean((clip1 > pg3) & (a < 0)))
