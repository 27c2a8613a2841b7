"""rl/rollout.py with a scripted policy (no model): what is scored, what is cut, what enters training.

The policy answers by problem: each problem's meta output and solution text are fixed strings, the
"tokens" are the characters, and stopping follows the real sampler's rule (`generate._limits`), so the
rollout sees exactly the finish reasons the sampler would report.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from masa_jax.data.problem import Problem
from masa_jax.rl import rollout
from masa_jax.sampling.engine import BUDGET
from masa_jax.sampling.generate import _limits

EOS = 0
MAX_LEN = 20  # rollout.max_response_length


class CharCodec:
    """Token id = character code; a prompt is the last message's text."""
    eos_ids = (EOS,)

    def encode_chat(self, messages):
        return [ord(c) for c in messages[-1]["content"]]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@dataclasses.dataclass
class Out:
    tokens: list
    logprobs: list
    finish_reasons: list


def scripted(meta_texts: dict[str, list[str]], solutions: dict[str, list[str]]):
    """generate(prompts, budgets, max_new_tokens, rng) answering problem `q` (found in the prompt text)
    with meta_texts[q][j % len] on the meta path and solutions[q][g % len] on the solution path (j, g:
    the rollout's index within its problem). Each response ends with EOS unless the sampler's limit
    stops it first."""
    codec = CharCodec()

    def generate(prompts, budgets, max_new_tokens, rng):
        budgets = None if budgets is None else [int(b) for b in budgets]  # as train.make_generate passes them
        limits, reasons = _limits(len(prompts), budgets, max_new_tokens)
        out = Out([], [], [])
        count: dict[str, int] = {}
        for i, ids in enumerate(prompts):
            text = codec.decode(ids)
            q = text[text.index("[") + 1:text.index("]")]
            n = count[text] = count.get(text, -1) + 1
            texts = meta_texts[q] if text.startswith("META") else solutions[q]
            toks = [ord(c) for c in texts[n % len(texts)]] + [EOS]
            reason = "eos"
            if len(toks) > limits[i]:
                toks, reason = toks[:limits[i]], "budget" if reasons[i] == BUDGET else "max_new_tokens"
            out.tokens.append(toks)
            out.logprobs.append(np.full(len(toks), -1.0, np.float32))
            out.finish_reasons.append(reason)
        return out

    return generate


def verify(texts, answers):
    return np.array([f"\\boxed{{{a}}}" in t for t, a in zip(texts, answers)]), {}


def _cfg(**kw) -> rollout.RolloutConfig:
    base = dict(num_meta=2, num_solutions=2, max_response_length=MAX_LEN, meta_max_new_tokens=80, use_meta=True,
                min_solution_length=1, meta_template="META [{question}]", solution_template="SOL [{question}]")
    return rollout.RolloutConfig(**(base | kw))


def _meta(pass_rate, length=None):
    fields = [f'"pass_rate": {pass_rate}'] + ([f'"solution_length": {length}'] if length is not None else [])
    return "<meta>m</meta>{" + ", ".join(fields) + "}"


def _problems(*names):
    return [Problem(uid=n, question=n, answer="7") for n in names]


def _run(problems, policy, cfg, active):
    return rollout.run_rollouts(problems, generate=policy, codec=CharCodec(), verify=verify, cfg=cfg,
                                efficient_active=active, rng=jax.random.key(0))


def test_the_eos_sampler_rule_matches_the_contract():
    # A budget equal to the global cap is no cutoff: it stops for the same reason as no budget.
    limits, reasons = _limits(3, [5, 20, 30], 20)
    assert limits.tolist() == [5, 20, 20]
    assert reasons.tolist()[1:] == [reasons[2]] * 2 and reasons[0] != reasons[2]


def test_a_full_length_correct_solution_scores_the_same_before_and_after_the_switch():
    """Issue 11.1: a budget equal to max_response_length (2 x predicted length >= the cap, no length
    parsed, or cutoff off) must not zero a correct answer that used the whole length."""
    full = "\\boxed{7}" + "." * (MAX_LEN - 9)        # exactly MAX_LEN tokens, no room for EOS
    assert len(full) == MAX_LEN
    metas = {"a": [_meta(4, 15)], "b": [_meta(4)], "c": [_meta(4, 3)]}   # budgets 20 (capped), 20 (none), 6
    sols = {q: [full] for q in metas}
    before = _run(_problems("a", "b", "c"), scripted(metas, sols), _cfg(), active=False)
    after = _run(_problems("a", "b", "c"), scripted(metas, sols), _cfg(), active=True)
    np.testing.assert_array_equal(before.correct, [[True, True]] * 3)
    np.testing.assert_array_equal(after.controls.budgets, [20, 20, 6])
    # a, b: same outcome, same reward; c: really cut at 6 tokens -> no final answer, 0.
    np.testing.assert_array_equal(after.correct, [[True, True], [True, True], [False, False]])
    np.testing.assert_array_equal(after.finish_budget, [[False, False], [False, False], [True, True]])
    off = _run(_problems("a", "b", "c"), scripted(metas, sols), _cfg(cutoff=False), active=True)
    np.testing.assert_array_equal(off.correct, [[True, True]] * 3)


def test_gating_skips_solutions_and_training_sequences_carry_their_advantages():
    metas = {"easy": [_meta(8, 10)], "mixed": [_meta(4, 10)]}
    sols = {"easy": ["\\boxed{7}"], "mixed": ["\\boxed{7}", "\\boxed{3}"]}
    ro = _run(_problems("easy", "mixed"), scripted(metas, sols), _cfg(), active=True)
    np.testing.assert_array_equal(ro.rolled_out, [False, True])
    np.testing.assert_array_equal(ro.correct, [[False, False], [True, False]])
    # Solution sequences of "mixed" (advantages of both signs), then its meta sequences (equal rewards: 0).
    np.testing.assert_array_equal(ro.sequences.kind, [0, 0, 1, 1])
    np.testing.assert_array_equal(ro.sequences.problem, [1, 1, 1, 1])
    assert ro.sequences.advantages[0] > 0 > ro.sequences.advantages[1]
    np.testing.assert_allclose(ro.sequences.advantages[2:], 0.0)


def test_dapo_filter_decides_per_path():
    """Issue 11.4: a zero-variance solution group loses its solution sequences but keeps its meta
    sequences (the meta path must learn 0/K and K/K too); a meta group with equal rewards loses its meta
    sequences; a gated problem is no kept group and brings nothing."""
    # Before the switch: two different predictions per problem, so every meta group has reward variance.
    metas = {q: [_meta(8, 10), _meta(2, 10)] for q in ("solved", "mixed", "failed")}
    sols = {"solved": ["\\boxed{7}"], "mixed": ["\\boxed{7}", "\\boxed{3}"], "failed": ["\\boxed{3}"]}
    ro = _run(_problems("solved", "mixed", "failed"), scripted(metas, sols), _cfg(), active=False)
    np.testing.assert_array_equal(rollout.solution_signal(ro), [False, True, False])
    np.testing.assert_array_equal(rollout.meta_signal(ro), [True, True, True])
    kept = rollout.dapo_filter(ro)
    assert [p.uid for p in kept.problems] == ["solved", "mixed", "failed"]
    pairs = sorted({(int(p), int(k)) for p, k in zip(kept.sequences.problem, kept.sequences.kind)})
    assert pairs == [(0, 1), (1, 0), (1, 1), (2, 1)]  # (problem, kind): no solutions of zero-variance groups
    np.testing.assert_array_equal(rollout.solution_signal(kept), [False, True, False])

    # After the switch: "failed" is gated (agreeing 0/8); identical meta rollouts give no meta signal.
    metas_g = {"solved": [_meta(4, 10)], "mixed": [_meta(4, 10)], "failed": [_meta(0, 10)]}
    ro_g = _run(_problems("solved", "mixed", "failed"), scripted(metas_g, sols), _cfg(), active=True)
    np.testing.assert_array_equal(ro_g.rolled_out, [True, True, False])
    np.testing.assert_array_equal(rollout.solution_signal(ro_g), [False, True, False])
    kept_g = rollout.dapo_filter(ro_g)
    assert [p.uid for p in kept_g.problems] == ["mixed"]
    np.testing.assert_array_equal(kept_g.sequences.kind, [0, 0])


def test_verifier_times_are_logged_under_time_not_with_the_counts():
    """The workers' CPU seconds vary run to run: under verify/ they broke the deterministic (non-time/)
    metrics that resume checks compare."""
    def timed_verify(texts, answers):
        ok, _ = verify(texts, answers)
        return ok, {"n": len(texts), "errors": 0, "worker_cpu_s": 0.25, "seconds": 1.5}

    metas, sols = {"a": [_meta(4, 10)]}, {"a": ["\\boxed{7}"]}
    ro = rollout.run_rollouts(_problems("a"), generate=scripted(metas, sols), codec=CharCodec(), verify=timed_verify,
                              cfg=_cfg(), efficient_active=False, rng=jax.random.key(0))
    assert ro.metrics["verify/n"] == 2.0 and ro.metrics["verify/errors"] == 0.0
    assert ro.metrics["time/verify_worker_cpu_s"] == 0.25
    assert not any(k.startswith("verify/") and ("cpu" in k or "second" in k) for k in ro.metrics)


def test_sample_records_show_one_rollout_per_problem_first_with_its_rewards():
    """The logged samples (config.log.num_samples): meta rollout i // P of problem i % P with its reward and
    parts, and solution rollouts of the rolled-out problems only (a gated one has no text), each with its
    reward; select() keeps the solution texts aligned with the problems."""
    metas = {"easy": [_meta(8, 10), _meta(8, 12)], "mixed": [_meta(4, 10), _meta(0, 10)]}
    sols = {"easy": ["\\boxed{7}"], "mixed": ["\\boxed{7}", "\\boxed{3}"]}
    ro = _run(_problems("easy", "mixed"), scripted(metas, sols), _cfg(), active=True)
    assert ro.rolled_out.tolist() == [False, True]  # "easy" predicted 8/8: gated
    recs = rollout.sample_records(ro, 3)
    meta = [r for r in recs if r["path"] == "meta"]
    sol = [r for r in recs if r["path"] == "solution"]
    assert [(r["uid"], r["text"]) for r in meta] == [("easy", metas["easy"][0]), ("mixed", metas["mixed"][0]),
                                                     ("easy", metas["easy"][1])]
    assert meta[1]["reward"] == ro.meta_rewards["total"][1, 0] and meta[1]["pred_pass_rate"] == 0.5
    assert meta[1]["reward_difficulty"] == ro.meta_rewards["difficulty"][1, 0] and meta[1]["pred_length"] == 10
    assert np.isnan(meta[0]["reward"])  # a gated problem's meta rollouts are not scored
    assert [(r["uid"], r["text"], r["reward"], r["length"]) for r in sol] == [
        ("mixed", "\\boxed{7}", 1.0, 9), ("mixed", "\\boxed{3}", 0.0, 9)]  # only 2 solution rollouts exist
    assert rollout.sample_records(ro, 0) == []
    kept = rollout.select(ro, np.array([False, True]))
    assert kept.solution_texts == [["\\boxed{7}", "\\boxed{3}"]]
    assert [r["uid"] for r in rollout.sample_records(kept, 5)] == ["mixed"] * 4


def test_meta_truncation_rate_counts_meta_rollouts_stopped_by_their_cap():
    """meta/truncated_rate: the share of meta rollouts that meta_max_new_tokens cut off (their JSON is lost,
    so they score 0) - what a lower cap than the authors' costs. Problem a's meta text fits in 80 tokens,
    problem b's (90 characters + EOS) does not: 2 of 4 rollouts."""
    metas = {"a": [_meta(4, 10)], "b": ["x" * 90]}
    sols = {"a": ["\\boxed{7}"], "b": ["\\boxed{7}"]}
    ro = _run(_problems("a", "b"), scripted(metas, sols), _cfg(), active=False)
    assert ro.metrics["meta/truncated_rate"] == 0.5
    ro = _run(_problems("a", "b"), scripted(metas, sols), _cfg(meta_max_new_tokens=200), active=False)
    assert ro.metrics["meta/truncated_rate"] == 0.0


def test_a_fourth_meta_reward_component_is_a_registry_entry_and_its_function(monkeypatch):
    """A new component (here: 1 when the meta answer predicts a length at all) registered in
    rewards/meta.py reaches the config check, the total, the metrics and the logged samples."""
    from masa_jax import config as config_lib
    from masa_jax import metrics as metrics_lib
    from masa_jax.errors import UserError
    from masa_jax.rewards import meta as meta_lib

    monkeypatch.setattr(meta_lib, "COMPONENTS", dict(meta_lib.COMPONENTS))
    meta_lib.register_component(meta_lib.RewardComponent(
        "has_length", lambda x: np.isfinite(x.len_pred).astype(np.float64), 0.0))

    c = config_lib.base_config()
    assert tuple(c.meta.weights) == (1 / 3, 1 / 3, 1 / 3, 0.0)
    c.model.path = "/m"
    c.meta.weights = (1 / 3, 1 / 3, 1 / 3)
    with pytest.raises(UserError, match=r"4 weights .*'has_length'"):
        config_lib.resolve(c)
    assert metrics_lib.meta_reward_keys()[-1] == "reward/meta_has_length"

    # The new part is 1 for "a" (its meta answers predict a length) and 0 for "b" (they do not).
    metas = {"a": [_meta(8, 10)], "b": [_meta(8)]}
    sols = {"a": ["\\boxed{7}"], "b": ["\\boxed{7}"]}
    w = (0.25, 0.25, 0.25, 0.25)
    ro = _run(_problems("a", "b"), scripted(metas, sols), _cfg(weights=w), active=False)
    r = ro.meta_rewards
    np.testing.assert_array_equal(r["has_length"], [[1, 1], [0, 0]])
    np.testing.assert_allclose(r["total"], sum(wi * r[k] for wi, k in zip(w, meta_lib.component_names())))
    assert ro.metrics["reward/meta_has_length"] == 0.5
    meta_records = [rec for rec in rollout.sample_records(ro, 4) if rec["path"] == "meta"]
    assert [rec["reward_has_length"] for rec in meta_records] == [1.0, 0.0, 1.0, 0.0]


def test_select_and_concat_carry_every_per_problem_field():
    """Every Rollouts field but sequences / metrics is per problem, and select / concat derive that list
    from the dataclass: each one comes out with the selected problems, none is dropped."""
    metas = {"a": [_meta(4, 10)], "b": [_meta(2, 10)], "c": [_meta(6, 10)]}
    sols = {"a": ["\\boxed{7}", "\\boxed{1}"], "b": ["\\boxed{7}"], "c": ["\\boxed{2}"]}
    ro = _run(_problems("a", "b", "c"), scripted(metas, sols), _cfg(), active=False)
    fields = [f.name for f in dataclasses.fields(rollout.Rollouts)]
    per_problem = [f for f in fields if f not in ("sequences", "metrics")]
    assert set(rollout._PER_PROBLEM) == set(per_problem)
    kept = rollout.select(ro, np.array([True, False, True]))
    both = rollout.concat(kept, rollout.select(ro, np.array([False, True, False])))
    for name in per_problem:
        value = getattr(kept, name)
        rows = len(value.pred_pass_mean) if name == "controls" else len(next(iter(value.values()))) \
            if isinstance(value, dict) else len(value)
        assert rows == 2, name
    assert [p.uid for p in both.problems] == ["a", "c", "b"]
    np.testing.assert_array_equal(both.correct, ro.correct[[0, 2, 1]])
    assert both.solution_texts == [ro.solution_texts[i] for i in (0, 2, 1)]
