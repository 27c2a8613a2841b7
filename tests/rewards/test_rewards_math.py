"""Tests of masa_jax.rewards.math: extraction, every normalisation rule, the pool, MATH accuracy."""
import time

import numpy as np
import pytest

from masa_jax.rewards import math as math_reward
from masa_jax.rewards.math import (
    MathVerifier,
    VerifierConfig,
    canonical_text,
    extract_answer,
    judge_answer,
    last_boxed,
    quick_decision,
    texts_match,
)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(num_workers=2, batch_budget_s=60.0)
    yield v
    v.close()


# ---- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{2}$ asymptotes", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\fbox{7}", "7"),
    ("first \\fbox{7} then \\boxed{1}", "1"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped set braces do not close the box
    ("\\boxed{\\begin{pmatrix} 1 \\\\{2} \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\{2} \\end{pmatrix}"),
    ("\\boxed 5.", "5"),
    ("\\boxed{3}\\boxedA{4}", "3"),  # \boxedA is another command
    ("\\boxed{x", None),  # truncated rollout: no final answer
    ("no box, the answer is 5", None),
    ("", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.timing
def test_last_boxed_caps_length_and_stays_linear():
    assert last_boxed("\\boxed{" + "1" * 2000 + "}", max_chars=1000) is None
    assert last_boxed("\\boxed{" + "1" * 999 + "}", max_chars=1000) == "1" * 999
    for hostile in ("\\boxedA" * 20000, "\\boxed{" + "{" * 100000, "\\boxed{" * 20000, "}" * 100000):
        t0 = time.perf_counter()
        assert last_boxed(hostile) is None
        assert time.perf_counter() - t0 < 0.5


def test_fallback_modes():
    text = "We find x = 12.\nThe answer is $\\frac{3}{4}$.\nChecking, 7 works"
    assert extract_answer(text) is None  # default: boxed only
    assert extract_answer(text, "answer_is") == "\\frac{3}{4}"
    assert extract_answer(text, "last_number") == "7"  # the authors' fallback: rewards truncation
    assert extract_answer("Final answer: \\(x+1\\)", "answer_is") == "x+1"
    assert extract_answer("total 1,234.5 dollars", "last_number") == "1234.5"
    assert extract_answer("\\boxed{9} and the answer is 3", "answer_is") == "9"  # a box wins
    assert extract_answer(None) is None
    with pytest.raises(ValueError):
        VerifierConfig(answer_fallback="first_number")


# ---- normalisation: one test per measured MATH miss -----------------------------------------------


def test_canonical_text_only_drops_latex_insignificant_things():
    assert canonical_text("\\left( 1, \\dfrac{1}{2} \\right)") == "(1,\\frac{1}{2})"
    assert canonical_text("\\text{June 20}") == "June20"
    assert canonical_text("111, \\! 111") == "111,111"
    assert canonical_text("\\pi r^2") == "\\pi r^2"  # not the unknown command "\pir"
    assert canonical_text("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}") == "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    assert canonical_text("\\$40") == "40"
    assert canonical_text("{x}+{y}") == "{x}+{y}"  # not one outer group


@pytest.mark.parametrize("pred, gold, expected", [
    # percentages written "44\%" against a target "44" (rows 385, 670, 1351, ...)
    ("44\\%", "44", True), ("7.2\\%", "7.2", True), ("44\\%", "0.44", True), ("44\\%", "45", False),
    # \text{} answers: times and dates (rows 655, 3770, 3881)
    ("\\text{June 20}", "{June20}", True), ("\\text{1:03 PM}", "{1:03PM}", True),
    ("\\text{4:30 p.m.}", "{4:30p.m.}", True), ("\\text{June 21}", "{June20}", False),
    # letter sets (rows 2465, 3123, 4456, 4552, 4631), order-free
    ("\\text{A, D}", "{A,D}", True), ("\\text{B, E, G}", "{B,E,G}", True),
    ("\\text{D, A}", "{A,D}", True), ("\\text{A, C}", "{A,D}", False), ("\\text{A}", "{A,D}", False),
    # complex numbers with spaces and a period inside the box (rows 2152, 2269)
    ("-3 + 6i", "-3+6i", True), ("\\frac{7}{5} + \\frac{1}{5} i.", "\\frac{7}{5}+\\frac{1}{5}i", True),
    ("-3 + 5i", "-3+6i", False),
    # thousands separators (row 3845) and dollars (rows 259, 345)
    ("111, \\! 111, \\! 111", "111,111,111", True), ("111,\\!111", "111111", True),
    ("\\$15,\\!000", "15,000", True), ("\\$40", "40", True), ("112,\\!111", "111111", False),
    # angles without ^\circ in the target (row 4457); a unit in \text (row 1991)
    ("45^\\circ, 135^\\circ", "45,135", True), ("30^{\\circ}", "30", True),
    ("8\\sqrt{3} \\text { square inches}", "8\\sqrt{3}{squareinches}", True),
])
def test_measured_rules(pred, gold, expected):
    assert judge_answer(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("5", "5", True), ("005", "5", True), ("5", "6", False), ("-3", "3", False),
    ("\\frac14", "0.25", True), ("\\frac{625}4", "156.25", True), ("-\\frac{3}{4}", "-3/4", True),
    ("\\frac{1}{3}", "\\frac{2}{6}", True), ("\\frac{1}{3}", "\\frac{1}{4}", False),
    ("0.333", "\\frac13", False), ("1.5", "2", False),
    ("0.3333333", "\\frac13", None),  # within math-verify's rounding: it decides
    ("\\sqrt{2}", "2", None), ("1", "\\frac{1}{0}", None),
])
def test_quick_decision_is_exact(pred, gold, expected):
    assert quick_decision(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\sqrt{13}", "2\\sqrt{3}", False),
    ("[1, 3)", "[1,3)", True),
    ("(1,3]", "[1,3)", False),
    ("0.3333333", "\\frac{1}{3}", True),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}", True),
    ("x = 5", "5", True),
    ("\\pi", "3.14", False),
    ("x^2\n+1", "1+x^2", True),  # a line break inside the box
])
def test_math_verify_equivalences(pred, gold, expected):
    assert judge_answer(pred, gold) is expected


@pytest.mark.timing
def test_parent_side_decisions_stay_cheap_on_hostile_answers():
    canonical_text.cache_clear()
    for hostile in ("{" * 499 + "1" + "}" * 499, "\\text{" * 140, "\\" * 500, "\\pi " * 200,
                    "1," * 499, "-" * 1000, "^\\circ" * 140):
        t0 = time.perf_counter()
        quick_decision(hostile, "1")
        quick_decision(hostile + "\\%", hostile)
        assert time.perf_counter() - t0 < 0.05, hostile[:20]


def test_texts_match_never_matches_an_empty_gold():
    assert not texts_match("", "")
    assert not texts_match("{}", "{}")


# ---- the pool -------------------------------------------------------------------------------------


def test_verify_batch_of_mixed_cases(verifier):
    responses = [
        "so $\\boxed{\\frac{\\sqrt{2}}{2}}$",  # sympy
        "thus \\boxed{42}",  # quick
        "thus \\boxed{41}",  # quick, wrong
        "I cannot decide",  # no answer
        "\\boxed{7",  # unclosed box
        "again $\\boxed{\\frac{\\sqrt{2}}{2}}$",  # same pair as row 0: verified once
        None,  # not even a string
        "\\boxed{5}",  # empty gold
    ]
    answers = ["\\frac{1}{\\sqrt{2}}", "42", "42", "1", "7", "\\frac{1}{\\sqrt{2}}", "1", ""]
    ok, m = verifier.verify(responses, answers)
    assert ok.dtype == np.bool_ and ok.shape == (8,)
    assert ok.tolist() == [True, True, False, False, False, True, False, False]
    assert m["parsed_checks"] == 1 and m["quick_decisions"] == 2
    assert m["no_answer"] == 2 and m["bad_box"] == 1 and m["bad_gold"] == 1
    assert m["correct"] == 3 and m["unfinished"] == m["hard_timeouts"] == m["errors"] == 0


def test_verify_empty_and_mismatched(verifier):
    ok, m = verifier.verify([], [])
    assert ok.shape == (0,) and m["n"] == 0
    with pytest.raises(ValueError):
        verifier.verify(["a"], [])


def test_math_subset_accuracy_both_ways(verifier, math_rows, perturb):
    """1,000 fixed MATH test rows (every 5th); the full 5,000 run in experiments/bench_rewards.py."""
    targets = [r["target"] for r in math_rows]
    wrong = perturb(targets, canonical_text)
    idx = list(range(0, len(math_rows), 5))
    solutions = [math_rows[i]["solution"] for i in idx]
    ok, m = verifier.verify(solutions, [targets[i] for i in idx])
    missed = [(math_rows[i]["row"], targets[i], extract_answer(math_rows[i]["solution"]))
              for i, good in zip(idx, ok) if not good]
    assert ok.mean() >= 0.996, missed
    bad, m_bad = verifier.verify(solutions, [wrong[i] for i in idx])
    accepted = [(math_rows[i]["row"], wrong[i], extract_answer(math_rows[i]["solution"]))
                for i, b in zip(idx, bad) if b]
    assert 1 - bad.mean() >= 0.995, accepted
    assert m["unfinished"] == m_bad["unfinished"] == 0  # an unfinished item must not pass as "wrong"


def test_module_level_verify_batch_uses_one_lazy_default_pool():
    try:
        ok = math_reward.verify_batch(["The answer is 5.", "\\boxed{5}"], ["5", "5"],
                                      num_workers=1, answer_fallback="answer_is")
        assert ok.tolist() == [True, True]
        pool = math_reward.default_verifier(num_workers=1, answer_fallback="answer_is")
        assert pool is math_reward.default_verifier(num_workers=1, answer_fallback="answer_is")
        ok, m = math_reward.verify_batch(["\\boxed{\\sqrt{4}}"], ["2"], return_metrics=True,
                                         num_workers=1, answer_fallback="answer_is")
        assert ok.tolist() == [True] and m["parsed_checks"] == 1
    finally:
        math_reward.close_default()
    assert math_reward._default is None
