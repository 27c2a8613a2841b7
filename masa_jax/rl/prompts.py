"""Prompt builders for the two rollout paths and the expert meta-trajectory serialiser.

Method doc sections 1 and 4: the solution prompt (problem + step-by-step / ``\\boxed{}`` instruction,
optionally a notion hint), the meta prompt (system message + a request to reason inside
``<meta></meta>`` and emit one JSON with ``math_notion`` / ``pass_rate`` / ``solution_length``), and
``serialize_expert_meta``, which writes a rewritten expert meta output in exactly the format
``meta.parse`` reads back.

Templates are plain ``str.format`` strings with named fields, so a config can replace them (the toy
world uses short ones). Fields: meta ``{question}``, ``{k}``, ``{min_length}``, ``{max_length}``,
``{example_length}``; solution ``{question}``; hint ``{notions}``. Literal braces in a template are
written ``{{`` / ``}}``; braces in the question itself need no escaping (it is a value).
Messages are chat dicts ``{"role": ..., "content": ...}`` for the tokenizer's chat template.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from masa_jax.rewards.meta import MAX_NOTION_CHARS, MAX_NOTIONS, braces_balanced

SYSTEM_PROMPT = "You are a helpful assistant."

# The named fields each template is formatted with (config templates are checked against them at start).
META_FIELDS = ("question", "k", "min_length", "max_length", "example_pass_rate", "example_length")
SOLUTION_FIELDS = ("question",)

SOLUTION_TEMPLATE = (
    "{question} Let's think step by step and output the final answer within \\boxed{{}}."
)

META_TEMPLATE = (
    "Do not solve the following math problem yet. First assess it.\n\n"
    "Problem:\n{question}\n\n"
    "Reason about the problem between <meta> and </meta>: which mathematical notions a correct "
    "solution will need, how difficult the problem is, and how long a correct solution will be.\n"
    "After </meta>, output exactly ONE JSON object with these keys:\n"
    '- "math_notion": a list of strings, the mathematical notions a correct solution will use, '
    "leaving out notions already named in the problem;\n"
    '- "pass_rate": an integer from 0 to {k}, how many of {k} independent attempts at this '
    "problem you expect to be correct;\n"
    '- "solution_length": an integer from {min_length} to {max_length}, the expected length in '
    "tokens of a correct solution.\n"
    "Format:\n"
    "<meta> your assessment </meta>\n"
    '{{"math_notion": ["...", "..."], "pass_rate": {example_pass_rate}, '
    '"solution_length": {example_length}}}'
)

HINT_TEMPLATE = "\n\nHint: the problem can be solved using these notions: {notions}."

MIN_SOLUTION_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The overridable prompt texts (config strings); ``system=None`` sends no system message."""

    meta: str = META_TEMPLATE
    solution: str = SOLUTION_TEMPLATE
    hint: str = HINT_TEMPLATE
    system: str | None = SYSTEM_PROMPT


def _clean_notions(notions: Sequence[str] | None) -> list[str]:
    """Stripped, single-spaced, non-empty, first occurrence kept, within ``meta.parse``'s limits;
    control characters become spaces (so JSON writes no ``\\n``/``\\b`` escape that could be
    mistaken for LaTeX when read back)."""
    out: list[str] = []
    for n in notions or ():
        if not isinstance(n, str):
            continue
        n = " ".join("".join(c if c.isprintable() else " " for c in n).split())
        if n and len(n) <= MAX_NOTION_CHARS and n not in out:
            out.append(n)
    return out[:MAX_NOTIONS]


def _json_string(s: str) -> str:
    """A JSON string literal that ``meta.parse`` reads back as ``s``: ``</meta>`` is written
    ``<\\/meta>`` (so the tag search cannot land inside the JSON) and, only when the braces of ``s``
    are unbalanced, braces are written ``\\u007b``/``\\u007d`` (so the brace scanner still finds
    the whole object). Balanced LaTeX such as ``\\frac{a}{b}`` stays readable."""
    out = json.dumps(s, ensure_ascii=False).replace("</meta>", "<\\/meta>")
    if not braces_balanced(out):
        out = out.replace("{", "\\u007b").replace("}", "\\u007d")
    return out


def meta_prompt(question: str, *, max_length: int, k: int = 8, template: str | None = None,
                system: str | None = SYSTEM_PROMPT, min_length: int = MIN_SOLUTION_LENGTH
                ) -> list[dict]:
    """Chat messages of the meta prompt ``q_meta``: [system, user].

    ``max_length`` is the max *response* length of the run (the authors' code used the prompt
    length by mistake); ``k`` the number of attempts ``pass_rate`` counts out of.
    """
    if max_length < min_length:
        raise ValueError(f"max_length {max_length} < min_length {min_length}")
    values = dict(question=question, k=k, min_length=min_length, max_length=max_length,
                  example_pass_rate=(k + 1) // 2, example_length=min(max_length, max(min_length, 1024)))
    user = (template or META_TEMPLATE).format(**values)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": user}]


def hint_suffix(notions: Sequence[str] | None, *, template: str | None = None) -> str:
    """``"\\n\\nHint: the problem can be solved using these notions: a, b, c."``, or "" when there
    are no (non-empty) notions."""
    cleaned = _clean_notions(notions)
    if not cleaned:
        return ""
    return (template or HINT_TEMPLATE).format(notions=", ".join(cleaned))


def solution_prompt(question: str, *, hint_notions: Sequence[str] | None = None,
                    template: str | None = None, hint_template: str | None = None,
                    system: str | None = None) -> list[dict]:
    """Chat messages of the solution prompt ``q_sol`` (one user message; a system message only
    when given). With ``hint_notions`` the hint suffix is appended (training only: evaluation never
    passes hints)."""
    user = (template or SOLUTION_TEMPLATE).format(question=question)
    user += hint_suffix(hint_notions, template=hint_template)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": user}]


def serialize_expert_meta(reasoning: str, notions: Sequence[str], pass_rate_int: int,
                          solution_length: int) -> str:
    """``"<meta>{reasoning}</meta>\\n{json}"``, an expert meta-trajectory (docs/method.md §4).

    ``pass_rate_int`` is round(d_sol * K) and ``solution_length`` the mean correct length, both the
    true statistics of the step. ``meta.parse`` of the result gives back exactly ``(cleaned notions,
    pass_rate_int / K, solution_length)`` (for pass_rate_int <= K). The reasoning is stripped and a
    ``</meta>`` inside it broken up, so that the JSON stays the text after the last tag.
    """
    if isinstance(pass_rate_int, bool) or int(pass_rate_int) != pass_rate_int or pass_rate_int < 0:
        raise ValueError(f"pass_rate_int must be a non-negative integer, got {pass_rate_int!r}")
    if isinstance(solution_length, bool) or int(solution_length) != solution_length or solution_length < 1:
        raise ValueError(f"solution_length must be a positive integer, got {solution_length!r}")
    reasoning = (reasoning or "").replace("</meta>", "</ meta>").strip()
    notion_list = ", ".join(_json_string(n) for n in _clean_notions(notions))
    payload = (f'{{"math_notion": [{notion_list}], "pass_rate": {int(pass_rate_int)}, '
               f'"solution_length": {int(solution_length)}}}')
    return f"<meta>{reasoning}</meta>\n{payload}"
