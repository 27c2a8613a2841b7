"""Answer extraction and grading for the out-of-domain benchmarks. Pure functions on untrusted text: regular
expressions and float parsing only (nothing is evaluated); MBPP code runs only in `sandbox`.

Choice benchmarks (GPQA-Diamond, R-Bench, ARC-Challenge and the five logic sets), as the authors' eval/eval.py:
for the logic sets the text after the last "The correct option is:" (their few-shot answer line) is the
answer; otherwise the final answer statement: the last `\\boxed{...}`, else the last "answer is" / "option is" /
"Answer:" phrase, else a response that is only a label. The statement must name exactly one of the
problem's option labels; one naming two ("A or C") is no answer. Stricter than the authors' `get_choice`,
which falls back to the first stand-alone capital letter anywhere in the last 2000 characters (an "A" used
as a word counts there).

SciBench (numeric): the last `\\boxed{...}` (as the authors' verl `compute_score`), else the last "answer is"
phrase; its first number, with a `\\times 10^{k}` / `e-k` exponent, against the gold `answer_number` with
SciBench's own rule, relative error < 5 %. The gold is given in the row's `unit` (e.g. "$10^{-19}$ J"), so an
answer with the unit's power of ten written out (3.2e-19 for 3.2 in units of 10^-19 J) is accepted too.

MBPP: the first ```python (or ```) block of the response, else the whole response (the authors'
human_eval/evaluation.py), followed by the row's test asserts, run in `sandbox`.
"""
from __future__ import annotations

import math
import re

LOGIC_ANSWER_PHRASE = "The correct option is:"  # the authors' few-shot answer line (eval/eval.py LABEL_PHRASE)

_TAIL = 4000  # characters of a response searched for the final answer
_INDICATOR_RE = re.compile(r"(?:correct option is|correct answer is|answer is|option is|answer\s*:)", re.I)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    i = text.rfind("\\boxed")
    while i >= 0:
        j = i + len("\\boxed")
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                if depth == 0:
                    return text[j + 1:k]
                k += 1
        i = text.rfind("\\boxed", 0, i)
    return None


def _labels_named(statement: str, labels: tuple[str, ...]) -> set[str]:
    r"""Option labels standing alone in `statement` ("A", "(B)", "C)", "\text{D}"; not the "A" of "A study")."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", statement)
    found = set()
    for m in re.finditer(r"(?<![A-Za-z0-9])([A-Z0-9])(?![A-Za-z0-9])", s):
        label = m.group(1)
        word = re.match(r" ([a-z]+)", s[m.end():])
        # "A study" is the article; "A) True", "A.", "A:", "(A)", "A or C", "A" at the end are labels.
        if label in labels and not (label == "A" and word and word.group(1) not in ("or", "and", "nor")):
            found.add(label)
    return found


def _one_label(statement: str, labels: tuple[str, ...]) -> str | None:
    named = _labels_named(statement.strip().split("\n")[0] if statement.strip() else "", labels)
    return named.pop() if len(named) == 1 else None


def extract_choice(text: str, labels: tuple[str, ...], answer_phrase: str | None = None) -> str | None:
    """The option label the response answers (module doc), or None."""
    tail = text[-_TAIL:]
    if answer_phrase and answer_phrase in tail:
        return _one_label(tail.rsplit(answer_phrase, 1)[1], labels)
    boxed = last_boxed(tail)
    if boxed is not None:
        return _one_label(boxed, labels)
    indicators = list(_INDICATOR_RE.finditer(tail))
    if indicators:
        return _one_label(tail[indicators[-1].end():], labels)
    bare = tail.strip()
    if re.fullmatch(r"\(?[A-Z0-9][).:]?", bare):
        return _one_label(bare, labels)
    return None


def grade_choice(text: str, gold: str, labels: tuple[str, ...], answer_phrase: str | None = None) -> bool:
    return extract_choice(text, labels, answer_phrase) == gold


_NUMBER_RE = re.compile(
    r"(?<![\w.])([-+−]?\d+(?:,\d{3})*(?:\.\d+)?|[-+−]?\.\d+)"             # 1,234.5 / .5
    r"(?:\s*[eE]\s*([-+−]?\d+)"                                          # 3.2e-19
    r"|\s*(?:\\times|\\cdot|×|x|\*)\s*10\s*\^\s*\{?\s*([-+−]?\d+)\s*\}?)?")  # 3.2 \times 10^{-19}


def parse_number(statement: str) -> float | None:
    """The first number of an answer statement (LaTeX thousands separators and x 10^k exponents read), or None."""
    s = statement.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("$", "").replace("−", "-")
    s = re.sub(r"\\(?:d?frac)\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}\s*\{\s*([-+]?\d+(?:\.\d+)?)\s*\}",
               lambda m: repr(float(m.group(1)) / float(m.group(2))) if float(m.group(2)) else m.group(0), s)
    m = _NUMBER_RE.search(s)
    if m is None:
        return None
    try:
        value = float(m.group(1).replace(",", "").replace("−", "-"))
        exponent = m.group(2) or m.group(3)
        if exponent is not None:
            value *= 10.0 ** int(exponent.replace("−", "-"))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def unit_power_of_ten(unit: str) -> int:
    """k of a SciBench unit that starts with a power of ten ("$10^{-19}$ J" -> -19); 0 without one."""
    m = re.search(r"10\s*\^\s*\{?\s*([-+−]?\d+)\s*\}?", unit or "")
    return int(m.group(1).replace("−", "-")) if m else 0


def extract_number(text: str) -> float | None:
    tail = text[-_TAIL:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return parse_number(boxed)
    indicators = list(re.finditer(r"answer is|answer\s*:", tail, re.I))
    if indicators:
        return parse_number(tail[indicators[-1].end():].split("\n")[0])
    return None


def numbers_match(pred: float, gold: float, rel_tol: float = 0.05) -> bool:
    """SciBench's rule: relative error below 5 % (absolute 1e-8 for a gold 0)."""
    if gold == 0:
        return abs(pred) < 1e-8
    return abs(pred - gold) / abs(gold) < rel_tol


def grade_number(text: str, gold: float, unit: str = "") -> bool:
    pred = extract_number(text)
    if pred is None:
        return False
    k = unit_power_of_ten(unit)
    return numbers_match(pred, gold) or (k != 0 and numbers_match(pred / 10.0 ** k, gold))


_CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n?([\s\S]*?)```", re.I)


def extract_code(text: str) -> str:
    """The first fenced code block of the response, else the response itself."""
    m = _CODE_BLOCK_RE.search(text)
    return m.group(1) if m else text


def mbpp_program(response: str, tests: tuple[str, ...], setup: str = "") -> str:
    """The program that passes iff the response's code passes the row's asserts."""
    return "\n".join([extract_code(response), setup, *tests]) + "\n"
