"""Calibration and would-be gating numbers of `masa_jax.evaluation.meta_eval` against values worked out by
hand on made-up predictions, and the meta sampling path on a scripted policy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from masa_jax.evaluation import meta_eval, paper
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl.controls import ControlConfig

MP = meta_lib.MetaPrediction
EMPTY = meta_lib.EMPTY

# 4 problems, M = 2 meta predictions, n = 4 solutions each.
PREDS = [
    [MP(("add",), 1.0, 10), MP(("add",), 1.0, 30)],  # predicted all right, agreeing: gated (right: 4 of 4)
    [MP(None, 0.0, None), MP(None, 0.0, 40)],        # predicted all wrong, agreeing: gated (wrong: 1 of 4 right)
    [MP(None, 0.5, 100), MP(None, None, 60)],        # one parsed pass rate < gate_min_valid: never gated
    [EMPTY, EMPTY],                                  # nothing parsed: left out of the calibration
]
CORRECT = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
LENGTHS = np.array([[12, 14, 16, 18], [20, 50, 60, 70], [30, 50, 90, 90], [5, 5, 5, 5]])


def test_calibration_numbers_by_hand():
    r = meta_eval.calibration(PREDS, CORRECT, LENGTHS, ControlConfig(gate_std=0.1, gate_tol=0.0))
    s = r.summary
    # Per problem: predicted pass (mean of parsed) 1, 0, 0.5, nan; actual 1, 0.25, 0.5, 0.
    np.testing.assert_allclose(r.per_problem["pred_pass"], [1.0, 0.0, 0.5, np.nan])
    np.testing.assert_allclose(r.per_problem["true_pass"], [1.0, 0.25, 0.5, 0.0])
    # Lengths: predicted (mean of parsed) 20, 40, 80, nan; actual = mean length of the CORRECT samples.
    np.testing.assert_allclose(r.per_problem["pred_length"], [20.0, 40.0, 80.0, np.nan])
    np.testing.assert_allclose(r.per_problem["true_length"], [15.0, 20.0, 40.0, np.nan])
    assert s["parse_rate_pass"] == 5 / 8 and s["parse_rate_length"] == 5 / 8 and s["parse_rate_notion"] == 2 / 8
    # Pass rate over the 3 problems with a prediction: |1-1|, |0-0.25|, |0.5-0.5|.
    assert s["pass_problems"] == 3
    assert s["pass_mae"] == pytest.approx(0.25 / 3)
    # x = (1, 0, .5), y = (1, .25, .5): sum dx dy = .375, sum dx^2 = .5, sum dy^2 = 42/144 -> r = 4.5 / sqrt(21).
    assert s["pass_pearson"] == pytest.approx(4.5 / math.sqrt(21))
    assert s["pred_pass_mean"] == pytest.approx(0.5) and s["true_pass_mean"] == pytest.approx(1.75 / 4)
    # Length over (20, 15), (40, 20), (80, 40): MAE 65 / 3; r = 800 / sqrt(16800 / 9 * 350) = 2400 / sqrt(5880000).
    assert s["length_problems"] == 3
    assert s["length_mae"] == pytest.approx(65 / 3)
    assert s["length_pearson"] == pytest.approx(2400 / math.sqrt(5_880_000))
    # Gating: problems 0 and 1; right only for problem 0 (problem 1 had a correct sample).
    np.testing.assert_array_equal(r.per_problem["gated"], [True, True, False, False])
    assert (s["gated"], s["gated_predicted_right"], s["gated_predicted_wrong"]) == (2, 1, 1)
    assert s["gated_fraction"] == 0.5 and s["gate_precision"] == 0.5
    # Zero-variance problems: 0 (all right) and 3 (all wrong, not gated: nothing parsed) -> recall 1/2.
    assert s["zero_variance_problems"] == 2 and s["gate_recall"] == 0.5
    assert s["gate_skipped_samples"] == 8
    assert s["gate_skipped_tokens"] == 60 + 200 and s["gate_skipped_token_fraction"] == pytest.approx(260 / 540)


def test_gating_thresholds_come_from_the_config():
    """gate_std=0 gates nothing (std < 0 is impossible); gate_tol widens "all right": agreeing predictions
    0.75 / 0.875 (mean 0.8125, std 0.0625) are gated with tolerance 0.25, not with 0."""
    none = meta_eval.calibration(PREDS, CORRECT, LENGTHS, ControlConfig(gate_std=0.0))
    assert none.summary["gated"] == 0 and math.isnan(none.summary["gate_precision"])
    preds = [[MP(None, 0.75, None), MP(None, 0.875, None)]] + PREDS[1:]
    strict = meta_eval.calibration(preds, CORRECT, LENGTHS, ControlConfig(gate_std=0.1, gate_tol=0.0))
    loose = meta_eval.calibration(preds, CORRECT, LENGTHS, ControlConfig(gate_std=0.1, gate_tol=0.25))
    assert strict.per_problem["gated"].tolist() == [False, True, False, False]
    assert loose.per_problem["gated"].tolist() == [True, True, False, False]  # mean 0.8125 >= 1 - 0.25


def test_sample_meta_and_protocol_on_a_scripted_policy():
    """run_protocol with --meta on a scripted policy: solution samples right iff k < i, meta answers claiming
    pass_rate i of 8; the report equals `calibration` of the same numbers."""
    from collections import namedtuple

    from masa_jax import config as config_lib
    from masa_jax.data.problem import Problem

    problems = [Problem(uid=f"t:{i}", question=f"q{i}", answer=str(i)) for i in range(3)]
    n, M = 4, 2
    Out = namedtuple("Out", "tokens finish_reasons")

    class Codec:
        def encode_chat(self, messages):
            text = messages[-1]["content"]
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    def generate(prompt_ids, budgets, max_new_tokens, rng):
        texts = []
        for ids in prompt_ids:
            prompt = "".join(chr(i) for i in ids)
            i = int(next(c for c in prompt if c.isdigit()))
            if "pass_rate" in prompt:  # the meta prompt
                texts.append(f'<meta>x</meta>{{"pass_rate": {2 * i}, "solution_length": {10 * (i + 1)}}}')
            else:
                k = sum(1 for t in texts if t.startswith(f"S{i}"))
                texts.append(f"S{i} \\boxed{{{i if k < i else 'x'}}}")
        return Out([[ord(c) for c in t] for t in texts], ["max_new_tokens"] * len(texts))

    def verify(texts, answers):
        return np.array([t.endswith(f"{{{a}}}") for t, a in zip(texts, answers)]), {}

    config = config_lib.base_config()
    config.rollout.num_meta = M
    settings = paper.resolve_settings(config, {"n": n, "ks": "1,2", "meta": True})
    results, reports = paper.run_protocol({"b": problems}, generate, Codec(), verify, settings, config=config,
                                          rng_fn=lambda i, kind: None)
    r = results["b"]
    assert r["pass@1"] == pytest.approx((0 + 1 + 2) / 12)
    m = r["meta"]
    np.testing.assert_allclose(reports["b"].per_problem["pred_pass"], [0.0, 0.25, 0.5])
    np.testing.assert_allclose(reports["b"].per_problem["true_pass"], [0.0, 0.25, 0.5])
    assert m["pass_mae"] == 0.0 and m["pass_pearson"] == pytest.approx(1.0)
    assert m["gated"] == 1 and m["gate_precision"] == 1.0  # problem 0: predicted 0 of 8 twice, really 0 of 4
    assert results["average"]["meta"]["problems"] == 3
