"""Tests of masa_jax.rewards.answers that need no worker pool (the pool and MATH runs are in
test_rewards_math.py)."""
import pytest

from masa_jax.rewards.answers import judge_answer, quick_decision, texts_match


@pytest.mark.parametrize("pred, gold, expected", [
    ("50", "50\\%", True), ("50", "50%", True), ("50\\%", "50", True),  # either side carries the sign
    ("50%", "50\\%", True), ("50\\%", "50\\%", True),  # both do
    ("0.5", "50\\%", True), ("\\frac{1}{2}", "50\\%", True),  # p% also stands for p/100
    ("51", "50\\%", False), ("50\\%", "0.5\\%", False), ("0.5\\%", "50\\%", False),
    ("\\sqrt{2500}", "50\\%", True), ("\\sqrt{2401}", "50\\%", False),  # math-verify path
])
def test_percent_is_stripped_from_both_sides(pred, gold, expected):
    assert judge_answer(pred, gold) is expected
    assert judge_answer(gold, pred) is expected  # symmetric
    if expected and "sqrt" not in pred:
        assert quick_decision(pred, gold) is True  # decided without sympy


def test_texts_match_strips_percent_from_gold():
    assert texts_match("x", "x\\%") and texts_match("x\\%", "x")
    assert not texts_match("", "\\%") and not texts_match("\\%", "5\\%")  # "" matches nothing
