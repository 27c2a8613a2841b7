"""Tests of masa_jax.rl.prompts: message layout, config templates, hints, and the expert
serialiser round trip through meta.parse."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_jax.rewards import meta
from masa_jax.rl import prompts
from masa_jax.rewards.meta import MetaPrediction

Q = "Let $f(x) = x^{2} + 1$. Find $f(\\{2\\})$."


def test_meta_prompt_messages():
    msgs = prompts.meta_prompt(Q, max_length=8192)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == "You are a helpful assistant."
    user = msgs[1]["content"]
    assert Q in user  # braces of the question are a value, not template syntax
    assert "<meta>" in user and "</meta>" in user
    for key in ("math_notion", "pass_rate", "solution_length"):
        assert f'"{key}"' in user
    assert "from 0 to 8" in user and "from 128 to 8192" in user
    # the example in the prompt is itself what parse() accepts
    example = user[user.rindex("<meta>"):]
    assert meta.parse(example) == MetaPrediction(("...", "..."), 4 / 8, 1024)


def test_meta_prompt_takes_k_and_max_length_from_config():
    user = prompts.meta_prompt(Q, max_length=300, k=4)[1]["content"]
    assert "from 0 to 4" in user and "from 128 to 300" in user
    assert '"solution_length": 300' in user  # the example stays within range
    with pytest.raises(ValueError):
        prompts.meta_prompt(Q, max_length=100)


def test_templates_are_config_strings():
    toy = "Q: {question} | K={k} L<={max_length}"
    msgs = prompts.meta_prompt("1+1?", max_length=64, k=2, template=toy, system=None, min_length=1)
    assert msgs == [{"role": "user", "content": "Q: 1+1? | K=2 L<=64"}]
    sol = prompts.solution_prompt("1+1?", template="S: {question}", hint_notions=["add"],
                                  hint_template=" [{notions}]", system="sys")
    assert sol == [{"role": "system", "content": "sys"}, {"role": "user", "content": "S: 1+1? [add]"}]
    t = prompts.PromptTemplates(meta=toy, system=None)
    assert prompts.meta_prompt("x", max_length=200, template=t.meta, system=t.system)[0]["role"] == "user"


def test_solution_prompt_and_hint():
    plain = prompts.solution_prompt(Q)
    assert plain == [{"role": "user", "content": Q + " Let's think step by step and output the final "
                                                     "answer within \\boxed{}."}]
    hinted = prompts.solution_prompt(Q, hint_notions=["a", " b ", "", "a", "c"])
    assert hinted[0]["content"] == plain[0]["content"] + (
        "\n\nHint: the problem can be solved using these notions: a, b, c.")
    assert prompts.solution_prompt(Q, hint_notions=[]) == plain
    assert prompts.solution_prompt(Q, hint_notions=None) == plain
    assert prompts.hint_suffix(["x"]) == "\n\nHint: the problem can be solved using these notions: x."
    assert prompts.hint_suffix(None) == "" and prompts.hint_suffix(["  "]) == ""


def test_serialise_expert_meta_format_and_round_trip():
    text = prompts.serialize_expert_meta("Vieta applies. {roots}", ["Vieta's formulas", "\\frac{p}{q}"],
                                         3, 812)
    assert text == ('<meta>Vieta applies. {roots}</meta>\n'
                    '{"math_notion": ["Vieta\'s formulas", "\\\\frac{p}{q}"], "pass_rate": 3, '
                    '"solution_length": 812}')
    assert meta.parse(text) == MetaPrediction(("Vieta's formulas", "\\frac{p}{q}"), 3 / 8, 812)


def test_serialise_hostile_notions_and_reasoning():
    notions = ["set {1, 2", "x}y{", "a</meta>b", 'q"\\', "tab\tx", "line\nbreak", "  ", "dup", "dup"]
    reasoning = 'I guess {"pass_rate": 0} </meta> {"solution_length": 1}'
    text = prompts.serialize_expert_meta(reasoning, notions, 8, 1)
    assert meta.parse(text) == MetaPrediction(
        ("set {1, 2", "x}y{", "a</meta>b", 'q"\\', "tab x", "line break", "dup"), 1.0, 1)


def test_serialise_rejects_bad_statistics():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError):
            prompts.serialize_expert_meta("r", ["a"], bad, 100)
    for bad in (0, 10.5, False):
        with pytest.raises(ValueError):
            prompts.serialize_expert_meta("r", ["a"], 2, bad)


@settings(max_examples=300, deadline=None)
@given(reasoning=st.text(max_size=200), notions=st.lists(st.text(max_size=40), max_size=8),
       pass_rate=st.integers(0, 8), length=st.integers(1, 10**6))
def test_round_trip_property(reasoning, notions, pass_rate, length):
    text = prompts.serialize_expert_meta(reasoning, notions, pass_rate, length)
    assert meta.parse(text) == MetaPrediction(_cleaned(notions), pass_rate / 8, length)


def _cleaned(notions):
    """The notions an expert keeps, written out independently of prompts._clean_notions: every
    non-printable character a space, runs of white space one space, trimmed; empty ones, repeats and
    ones over 200 characters dropped; at most 64."""
    out = []
    for n in notions:
        n = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in n)).strip()
        if n and len(n) <= 200 and n not in out:
            out.append(n)
    return tuple(out[:64])


def test_cleaned_notions_by_hand():
    assert _cleaned(["  a\tb ", "a b", "", "\x00c\n", "d" * 201]) == ("a b", "c")
