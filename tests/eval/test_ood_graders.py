"""Answer extraction and grading of the out-of-domain benchmarks on hand-written responses: right, wrong,
malformed and several answers, per benchmark kind (masa_jax.evaluation.ood.graders)."""
import pytest

from masa_jax.evaluation.ood import graders as g

ABCD = ("A", "B", "C", "D")
PHRASE = g.LOGIC_ANSWER_PHRASE


@pytest.mark.parametrize("text, want", [
    # GPQA / ARC / R-Bench: the authors ask for the letter inside \boxed{}.
    ("The electron is negative, so \\boxed{B}.", "B"),                      # right layout
    ("Reasoning... \\boxed{\\text{C}}", "C"),
    ("\\boxed{(D)}", "D"),
    ("First I thought \\boxed{A}, but on reflection \\boxed{C}.", "C"),     # several: the last box
    ("\\boxed{A or C}", None),                                              # several in one statement: none
    ("\\boxed{E}", None),                                                   # not an option
    ("\\boxed{}", None),                                                    # malformed
    ("\\boxed{B", None),                                                    # unclosed box
    ("Therefore the answer is (B).", "B"),                                  # no box: the answer phrase
    ("The answer is A because the charge is negative.", None),              # "A because": the article reading
    ("Answer: D", "D"),
    ("C", "C"),                                                             # the bare label
    ("A study of the options shows nothing.", None),                        # no answer at all
    ("", None),
])
def test_choice_extraction(text, want):
    assert g.extract_choice(text, ABCD) == want


@pytest.mark.parametrize("text, gold, ok", [
    # Logic sets: the few-shot answer line "The correct option is: X" decides.
    ("Rex is a dog. So Rex barks.\n\nThe correct option is: A", "A", True),
    ("Reasoning...\nThe correct option is: B", "A", False),                 # wrong
    ("The correct option is: A\n------\nContext: more\nThe correct option is: C", "C", True),  # several: last
    ("The correct option is: A or B", "A", False),                          # hedged: no answer
    ("The correct option is: C) Uncertain", "C", True),
    ("The correct option is:", "A", False),                                 # malformed: nothing after
    ("I believe \\boxed{A}", "A", True),                                    # no phrase: the box
])
def test_logic_grading(text, gold, ok):
    assert g.grade_choice(text, gold, ("A", "B", "C"), PHRASE) is ok


@pytest.mark.parametrize("text, gold, unit, ok", [
    ("v = 100 / 4 = \\boxed{25} m/s", 25.0, "m/s", True),                  # right
    ("\\boxed{25.9}", 25.0, "m/s", True),                                   # within SciBench's 5 %
    ("\\boxed{26.5}", 25.0, "m/s", False),                                  # 6 %: wrong
    ("E = hc/lambda = \\boxed{3.2 \\times 10^{-19} \\mathrm{J}}", 3.2, "$10^{-19} \\mathrm{~J}$", True),  # unit's power
    ("\\boxed{3.2e-19}", 3.2, "$10^{-19}$ J", True),
    ("\\boxed{3.2}", 3.2, "$10^{-19}$ J", True),                            # in the unit as given
    ("\\boxed{3.2 \\times 10^{-18}}", 3.2, "$10^{-19}$ J", False),
    ("\\boxed{1{,}250}", 1250.0, "", True),                                 # LaTeX thousands separator
    ("\\boxed{\\frac{1}{4}}", 0.25, "", True),
    ("first \\boxed{7}, finally \\boxed{25}", 25.0, "", True),              # several boxes: the last
    ("The answer is 25 m/s.", 25.0, "", True),                              # no box: the answer phrase
    ("I get 25 in the end", 25.0, "", False),                               # no final answer statement
    ("\\boxed{fast}", 25.0, "", False),                                     # malformed: no number
    ("\\boxed{-25}", 25.0, "", False),
])
def test_scibench_grading(text, gold, unit, ok):
    assert g.grade_number(text, gold, unit) is ok


def test_parse_number_and_unit_power():
    assert g.parse_number("-1.5 \\cdot 10^{3} m") == pytest.approx(-1500.0)
    assert g.parse_number("$2.5\\,\\mathrm{kg}$") == 2.5
    assert g.parse_number("none") is None
    assert g.unit_power_of_ten(" $10^{-19} \\mathrm{~J}$") == -19 and g.unit_power_of_ten("m/s") == 0


def test_mbpp_code_extraction():
    two = "Here:\n```python\ndef f():\n    return 1\n```\nor\n```python\ndef f():\n    return 2\n```"
    assert g.extract_code(two) == "def f():\n    return 1\n"            # several blocks: the first (authors)
    assert g.extract_code("def f():\n    return 3") == "def f():\n    return 3"   # no block: all of it
    prog = g.mbpp_program("```\ndef f(): return 1\n```", ("assert f() == 1",), "X = 0")
    assert prog == "def f(): return 1\n\nX = 0\nassert f() == 1\n"
