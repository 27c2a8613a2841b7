"""Tests of masa_jax.rewards.meta: parse() tolerance and ranges, notion matching, self_alignment
with hand-computed rewards for every rule of docs/method.md §2, and property tests."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_jax.rewards import meta
from masa_jax.rewards.meta import MetaPrediction, normalise_notion, occurs, parse, self_alignment, singularise

# ---- parse ------------------------------------------------------------------------------------------

GOOD = '{"math_notion": ["Vieta formulas", "AM-GM"], "pass_rate": 5, "solution_length": 900}'
GOOD_PRED = MetaPrediction(("Vieta formulas", "AM-GM"), 5 / 8, 900)


@pytest.mark.parametrize("text", [
    "<meta>think</meta>\n" + GOOD,
    "<meta>think</meta>" + GOOD.replace(", ", ",\n\n   ").replace("{", "{\n  "),  # white space
    "<meta>think</meta>\n```json\n" + GOOD + "\n```",  # fenced
    "<meta>think</meta>\n" + GOOD.replace('"', "'"),  # single quotes
    "<meta>think</meta>\n" + GOOD.replace("900}", "900,}").replace('"]', '",]'),  # trailing commas
    "<meta>think</meta>\n" + GOOD.replace('"', "'").replace("900}", "900,}"),  # both
    GOOD,  # no tag: the whole text
    "<meta>a {stray brace</meta> So { here: " + GOOD,  # unmatched braces around it
    "<meta>x</meta>" + '{"math_notion": ["old"], "pass_rate": 1}' + " then " + GOOD,  # last wins
    "<meta>" + '{"pass_rate": 1}' + "</meta>" + GOOD,  # an object inside <meta> is not the answer
    "<meta>t</meta>" + GOOD.replace('"pass_rate"', '"Pass_Rate "'),  # key spelling
])
def test_parse_tolerates_formats(text):
    assert parse(text) == GOOD_PRED


def test_parse_keeps_latex_braces_in_notions():
    raw = '</meta>{"math_notion": ["\\frac{a}{b}", "\\theta", "\\binom{n}{k}", "set \\{1,2\\}"], "pass_rate": 2}'
    assert parse(raw).notions == ("\\frac{a}{b}", "\\theta", "\\binom{n}{k}", "set \\{1,2\\}")
    escaped = '</meta>{"math_notion": ["\\\\frac{a}{b}", "tab\\t 1", "\\u00e9t\\u00e9"], "pass_rate": 2}'
    assert parse(escaped).notions == ("\\frac{a}{b}", "tab\t 1", "été")  # \\t + non-letter: a JSON tab
    single = "</meta>{'math_notion': ['\\frac{1}{2}', 'Bayes rule'], 'pass_rate': 2,}"
    assert parse(single).notions == ("\\frac{1}{2}", "Bayes rule")



@pytest.mark.parametrize("notions, expected", [
    (r'["piecewise \\left\\{", "x"]', ("piecewise \\left\\{", "x")),  # JSON-escaped LaTeX brace
    (r'["}", "{", "a \"{\" b"]', ("}", "{", 'a "{" b')),  # braces and escaped quotes in strings
    (r"['piecewise \\left\\{', 'x']", ("piecewise \\left\\{", "x")),  # single-quoted fallback
])
def test_parse_skips_braces_inside_json_strings(notions, expected):
    text = '<meta>t</meta>{"math_notion": %s, "pass_rate": 5, "solution_length": 900}' % notions
    assert parse(text) == MetaPrediction(expected, 5 / 8, 900)
    # prose with a stray brace and an odd quote before the object does not hide it either
    assert parse('<meta>t</meta>So { it is 5" long: ' + text[len("<meta>t</meta>"):]).pass_rate == 5 / 8


@pytest.mark.parametrize("quote", ['"', "'"])
@pytest.mark.parametrize("huge", ["1" + "0" * 5000, "-" + "9" * 5000])
def test_parse_overlong_int_voids_only_that_field(huge, quote):
    def obj(**fields):
        return "</meta>{%s}" % ", ".join(f"{quote}{k}{quote}: {v}" for k, v in fields.items())

    notions = f"[{quote}a{quote}]"
    assert parse(obj(math_notion=notions, pass_rate=huge, solution_length=700)) == P(["a"], None, 700)
    assert parse(obj(math_notion=notions, pass_rate=4, solution_length=huge)) == P(["a"], 0.5, None)
    # a digit run inside a string stays a (too long, dropped) notion
    long_notion = f"[{quote}x{huge}{quote}, {quote}b{quote}]"
    assert parse(obj(math_notion=long_notion, pass_rate=4)) == P(["b"], 0.5, None)


@pytest.mark.parametrize("notion, rate, length", [
    ("Math Notion", "Pass Rate", "Solution Length"),
    ("math-notion", "pass-rate", "solution-length"),
    ("mathNotion", "passRate", "solutionLength"),
    ("MATH_NOTIONS", "PASS_RATE", " Solution_Length "),
    ("math notions", "pass rate", "solution length"),
])
def test_parse_accepts_key_variants(notion, rate, length):
    text = '</meta>{"%s": ["Vieta formulas", "AM-GM"], "%s": 5, "%s": 900}' % (notion, rate, length)
    assert parse(text) == GOOD_PRED


def test_parse_keeps_every_notion():
    many = ["notion %d" % i for i in range(200)]
    text = '</meta>{"math_notion": %s, "pass_rate": 4}' % json.dumps(many)
    assert parse(text).notions == tuple(many)
    assert parse('</meta>{"math_notion": "%s", "pass_rate": 4}' % ", ".join(many)).notions == tuple(many)

@pytest.mark.parametrize("value, expected", [
    ("0", 0.0), ("8", 1.0), ("3", 0.375), ("9", None), ("-1", None),
    ("3.0", 0.375), ("1.0", 0.125), ('"5"', 0.625), ('"0.5"', 0.5), ("0.5", 0.5), ('"5/8"', 0.625),
    ('"9/8"', None), ('"1/0"', None), ("2.5", None), ("true", None), ("null", None), ('"high"', None),
    ("NaN", None), ("Infinity", None), ("-Infinity", None), ("[3]", None), ("1e999", None),
])
def test_pass_rate_forms_and_range(value, expected):
    pred = parse('</meta>{"pass_rate": %s, "solution_length": 700}' % value)
    assert pred.pass_rate == expected
    assert pred.length == 700  # one bad field does not spoil the others


def test_pass_rate_k_is_configurable():
    assert parse('{"pass_rate": 2}', k=4).pass_rate == 0.5
    assert parse('{"pass_rate": 5}', k=4).pass_rate is None


@pytest.mark.parametrize("value, expected", [
    ("512", 512), ("512.0", 512), ("512.5", None), ("0", None), ("1", 1), ("1000000", 1000000),
    ("1000001", None), ('"700"', 700), ("true", None), ("NaN", None), ("-5", None), ('"long"', None),
])
def test_solution_length_forms_and_range(value, expected):
    assert parse('{"solution_length": %s, "pass_rate": 4}' % value).length == expected


@pytest.mark.parametrize("value, expected", [
    ('["a", " b "]', ("a", "b")), ('"a, b ,c"', ("a", "b", "c")), ("[]", ()), ('["", "x"]', ("x",)),
    ("[1, 2]", None), ('["a", 3]', None), ("7", None), ('{"a": 1}', None), ("null", None),
])
def test_notion_forms(value, expected):
    assert parse('{"math_notion": %s, "pass_rate": 4}' % value).notions == expected


@pytest.mark.parametrize("text", [
    None, 12, "", "no json here", "</meta>", "{}", '{"other": 1}', "{'pass_rate': }",
    '{"pass_rate": 3', "</meta>{" * 1000, "{" * 100000, "}" * 100000, '{"pass_rate": ' * 30000,
    '{"math_notion": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"pass_rate": ' + "9" * 5000 + "}",
])
def test_parse_never_raises(text, caplog):
    """Hostile or broken texts give an empty prediction from the parser itself: `parse`'s last-resort
    ``except`` (which logs "meta.parse failed") must not be what catches them, or this test could not fail."""
    with caplog.at_level("ERROR", logger="masa_jax.rewards.meta"):
        out = parse(text)
    assert isinstance(out, MetaPrediction)
    assert out == MetaPrediction(None, None, None)
    assert not [r for r in caplog.records if "meta.parse failed" in r.getMessage()]


# ---- notion normalisation and matching ------------------------------------------------------------


@pytest.mark.parametrize("word, singular", [
    ("identities", "identity"), ("medians", "median"), ("boxes", "box"), ("matches", "match"),
    ("classes", "class"), ("series", "series"), ("species", "species"), ("class", "class"),
    ("calculus", "calculus"), ("axis", "axis"), ("powers", "power"), ("gas", "gas"),
    ("median", "median"),
])
def test_singularise(word, singular):
    assert singularise(word) == singular



@pytest.mark.parametrize("word, singular", [
    ("zeroes", "zero"), ("tomatoes", "tomato"), ("dominoes", "domino"), ("heroes", "hero"),
    ("echoes", "echo"), ("shoes", "shoe"), ("canoes", "canoe"), ("zeros", "zero"),
])
def test_singularise_oes_plurals(word, singular):
    assert singularise(word) == singular
    assert normalise_notion("Sum of " + word.title()) == "sum of " + singular

def test_normalise_notion():
    assert normalise_notion("  Power   Series ") == "power series"
    assert normalise_notion("Trigonometric\tIdentities") == "trigonometric identity"
    assert normalise_notion("   ") == ""


@pytest.mark.parametrize("notion, text, expected", [
    ("power", "sum of powers of two", True),  # the singular matches the plural
    ("sum", "we consume it", False),  # no match inside a longer word
    ("sum", "a summation", True),  # a word-boundary start may run into a longer word
    ("am-gm", "by am-gm we get", True),
    ("median", "the median.", True),
    ("\\frac", "x=\\frac{1}{2}", True),  # a notion not starting with a word character
    ("prime", "", False), ("", "anything", False),
])
def test_occurs(notion, text, expected):
    assert occurs(notion, text) is expected


# ---- self_alignment: hand-computed rewards -------------------------------------------------------

B = 0.01


def P(notions=None, pass_rate=None, length=None):
    return MetaPrediction(tuple(notions) if notions is not None else None, pass_rate, length)


def test_worked_example():
    problem = "Find the sum of all powers of 2 below 100."
    solutions = [
        "Use the Geometric Series formula: 2^7 - 1 = 127.",  # correct, 100 tokens
        "Add them up by brute force to get 126.",  # wrong, 200 tokens
        "By the geometric  series\nformula the answer is 127.",  # correct, 300 tokens
        "A geometric series gives 128.",  # wrong, 400 tokens
    ]
    correct = np.array([[True, False, True, False]])
    lengths = np.array([[100, 200, 300, 400]])
    preds = [[
        P(["Geometric Series", "Powers"], 0.5, 100),  # "power" is in the problem: excluded
        P(["sum"], 0.25, 300),  # the only notion is in the problem: notion reward 0
        P(["brute force", "Identities"], None, 301),
        P(["geometric series", "brute force"], 0.75, 99),
    ]]
    r = self_alignment(preds, [problem], [solutions], correct, lengths, base=B)
    # d_sol = 0.5; correct lengths 100 and 300 (inclusive bounds)
    # "geometric series": 2 correct - 1 wrong = 1 > 0; "brute force": 0 - 1 < 0; "identity": 0
    np.testing.assert_allclose(r["length"], [[1, 1, 0, 0]])
    np.testing.assert_allclose(r["difficulty"], [[1, 0.31622776601683794, 0, 0.31622776601683794]],
                               rtol=1e-6)
    np.testing.assert_allclose(r["notion"], [[1, 0, 0, 0.5]])
    np.testing.assert_allclose(r["total"], [[1, 0.4387425886722793, 0, 0.2720759220056126]], rtol=1e-6)
    for v in r.values():
        assert v.dtype == np.float32 and v.shape == (1, 4)


def test_no_correct_rollout_gives_length_zero():
    r = self_alignment([[P(length=50), P(length=60), P(pass_rate=0.0)]], ["q"], [["a", "b"]],
                       [[False, False]], [[50, 60]])
    np.testing.assert_allclose(r["length"], [[0, 0, 0]])
    np.testing.assert_allclose(r["difficulty"], [[0, 0, 1]])  # d_sol = 0 = pass_rate 0/8


def test_single_correct_rollout_is_rewardable_when_predicted_exactly():
    preds = [[P(length=500, pass_rate=3 / 8), P(length=499), P(length=501)]]
    r = self_alignment(preds, ["q"], [["x", "y", "z"]], [[False, True, False]], [[10, 500, 900]])
    np.testing.assert_allclose(r["length"], [[1, 0, 0]])
    # |3/8 - 1/3| = 1/24 -> 0.01 ** (1/24)
    np.testing.assert_allclose(r["difficulty"][0, 0], 0.8254041852680184, rtol=1e-6)


def test_all_correct_and_pass_rate_8_gives_difficulty_one():
    preds = [[parse('{"pass_rate": 8}'), parse('{"pass_rate": 0}'), parse('{"pass_rate": 4}')]]
    r = self_alignment(preds, ["q"], [["x"] * 4], [[True] * 4], [[100] * 4])
    np.testing.assert_allclose(r["difficulty"], [[1.0, 0.01, 0.1]], rtol=1e-6)


def test_base_is_configurable():
    r = self_alignment([[P(pass_rate=0.0)]], ["q"], [["x", "y"]], [[True, False]], [[1, 1]], base=0.25)
    np.testing.assert_allclose(r["difficulty"], [[0.5]])  # 0.25 ** 0.5
    with pytest.raises(ValueError):
        self_alignment([[P()]], ["q"], [["x"]], [[True]], [[1]], base=2.0)


def test_notions_all_inside_the_problem_give_zero():
    problem = "Use the Pythagorean theorem on the right triangles."
    sols = ["pythagorean theorem and a right triangle give 5"] * 2
    preds = [[P(["Pythagorean Theorem", "right triangle"]), P(["Right  Triangles"])]]
    r = self_alignment(preds, [problem], [sols], [[True, True]], [[1, 1]])
    np.testing.assert_allclose(r["notion"], [[0, 0]])


def test_notion_counting_rules():
    problem = "How many ways?"
    sols = [
        "The median of the Sum is 3; AM-GM also works.",  # correct
        "We take the medians and a summation.",  # correct
        "AM-GM: consume.",  # wrong
        "Guess via am-gm",  # wrong
    ]
    correct = [[True, True, False, False]]
    preds = [[
        P(["Medians"]),  # "median": 2 correct, 0 wrong -> 1
        P(["AM-GM"]),  # 1 correct - 2 wrong -> 0
        P(["sum"]),  # correct "Sum", correct "summation"; "consume" does not count -> 1
        P(["median", "MEDIANS", "am-gm"]),  # duplicates collapse: mean(1, 0) = 0.5
        P(["", "   "]),  # nothing left -> 0
        P([]),
        P(None),
        P(["Identities"]),  # no occurrence: count 0 is not > 0
    ]]
    r = self_alignment(preds, [problem], [sols], correct, [[1, 2, 3, 4]])
    np.testing.assert_allclose(r["notion"], [[1, 0, 1, 0.5, 0, 0, 0, 0]])


def test_equal_correct_and_wrong_mentions_give_zero():
    sols = ["induction", "induction", "induction", "other"]
    r = self_alignment([[P(["induction"])]], ["q"], [sols], [[True, False, False, True]], [[1] * 4])
    assert r["notion"][0, 0] == 0.0  # 1 correct - 2 wrong


def test_weights_make_ablations_config_runs():
    preds = [[P(["geometric series"], 0.5, 100)]]
    args = (preds, ["q"], [["geometric series", "no"]], [[True, False]], [[100, 90]])
    r = self_alignment(*args, weights={"length": 1.0})
    assert r["total"][0, 0] == pytest.approx(r["length"][0, 0]) == 1.0
    r = self_alignment(*args, weights=(0.5, 0.5, 0.0))
    assert r["total"][0, 0] == pytest.approx(1.0)
    r = self_alignment(*args)
    assert r["total"][0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        self_alignment(*args, weights={"lenght": 1.0})


def test_raw_texts_are_parsed_with_k():
    texts = [['</meta>{"pass_rate": 2, "solution_length": 100}', "garbage"]]
    r = self_alignment(texts, ["q"], [["a", "b"]], [[True, False]], [[100, 50]], k=4)
    np.testing.assert_allclose(r["difficulty"], [[1.0, 0.0]])  # 2/4 = d_sol
    np.testing.assert_allclose(r["length"], [[1.0, 0.0]])


def test_batch_of_problems_is_independent():
    preds = [[P(length=5)], [P(length=5)]]
    r = self_alignment(preds, ["a", "b"], [["x"], ["y"]], [[True], [False]], [[5], [5]])
    np.testing.assert_allclose(r["length"], [[1], [0]])


def test_shape_validation():
    with pytest.raises(ValueError):
        self_alignment([[P()]], ["q"], [["x", "y"]], [[True]], [[1]])
    with pytest.raises(ValueError):
        self_alignment([[P()], [P(), P()]], ["q", "r"], [["x"], ["y"]], [[True], [True]], [[1], [1]])


# ---- properties -----------------------------------------------------------------------------------

WORDS = ["prime", "primes", "sum", "consume", "median", "Power", "series", "box", "boxes", "AM-GM"]


@st.composite
def batches(draw):
    p, g, m = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    text = st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join)
    pred = st.builds(
        MetaPrediction,
        st.none() | st.lists(st.sampled_from(WORDS + ["", " "]), max_size=4).map(tuple),
        st.none() | st.floats(0.0, 1.0),
        st.none() | st.integers(1, 2000),
    )
    preds = [[draw(pred) for _ in range(m)] for _ in range(p)]
    problems = [draw(text) for _ in range(p)]
    sols = [[draw(text) for _ in range(g)] for _ in range(p)]
    correct = np.array(draw(st.lists(st.booleans(), min_size=p * g, max_size=p * g))).reshape(p, g)
    lengths = np.array(draw(st.lists(st.integers(1, 2000), min_size=p * g, max_size=p * g))).reshape(p, g)
    base = draw(st.floats(0.0, 1.0))
    return preds, problems, sols, correct, lengths, base


@settings(max_examples=150, deadline=None)
@given(batches())
def test_every_reward_is_finite_and_in_unit_interval(batch):
    preds, problems, sols, correct, lengths, base = batch
    r = self_alignment(preds, problems, sols, correct, lengths, base=base)
    for name in ("length", "difficulty", "notion", "total"):
        v = r[name]
        assert v.shape == (len(preds), len(preds[0])) and v.dtype == np.float32
        assert np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v <= 1 + 1e-6), name
    np.testing.assert_allclose(r["total"], (r["length"] + r["difficulty"] + r["notion"]) / 3, rtol=1e-5,
                               atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parse_of_any_text_is_in_range(text):
    out = parse(text)
    assert out.pass_rate is None or (0.0 <= out.pass_rate <= 1.0 and math.isfinite(out.pass_rate))
    assert out.length is None or (isinstance(out.length, int) and 1 <= out.length <= 10**6)
    assert out.notions is None or all(isinstance(n, str) and n for n in out.notions)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(meta.KEYS) + ["x"]),
                       st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True)
                       | st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=4)))
def test_parse_of_any_json_object_is_in_range(obj):
    import json

    out = parse("<meta>x</meta>" + json.dumps(obj))
    assert out.pass_rate is None or 0.0 <= out.pass_rate <= 1.0
    assert out.length is None or 1 <= out.length <= 10**6
