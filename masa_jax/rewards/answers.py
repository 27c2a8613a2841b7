"""Final-answer extraction and answer equivalence for the solution reward (docs/method.md §1).

Pure functions; ``masa_jax.rewards.math`` runs ``judge_answer`` in its worker pool and the cheap
``quick_decision`` in the parent.

* ``extract_answer`` / ``last_boxed``: the last ``\\boxed{...}`` (or a configured fallback), found by
  linear-time scans with the answer length capped; nothing is evaluated.
* ``canonical_text`` / ``texts_match`` / ``quick_decision``: string equality after LaTeX-insignificant
  rewrites, and exact comparison of plain number literals, so that the common cases never reach sympy.
* ``judge_answer``: math-verify on both sides, LaTeX path only (its ``ExprExtractionConfig`` would
  run ``sympy.parse_expr``, i.e. ``eval``, on model text). It must run in a main thread
  (math-verify times out with ``signal.alarm``).

The normalisation rules are only those a measured miss on the MATH test set needed; each has a test.
"""
from __future__ import annotations

import collections
import fractions
import functools
import re

FALLBACK_MODES = ("boxed", "answer_is", "last_number")

# -------- Answer extraction (parent side, linear time, nothing evaluated) -------------------------

_BOX_CMDS = ("\\boxed", "\\fbox")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)


def _balanced_group(text: str, start: int, max_chars: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``, or None if unclosed / too long.

    One regex pass (C speed) over brace tokens; ``\\x`` pairs are tokens of their own, so ``\\{`` /
    ``\\}`` (literal set braces) and ``\\\\`` (a row break, maybe followed by a real ``{``) do not
    confuse the depth count.
    """
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, start, min(len(text), start + max_chars + 2)):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : m.start()]
    return None


def last_boxed(text: str, max_chars: int = 1000) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``), or None.

    "Last" means the command that starts last (an unclosed last box gives None: a truncated rollout has
    no final answer). Content longer than ``max_chars`` gives None. O(len(text)).
    """
    n = len(text)
    found = {c: text.rfind(c) for c in _BOX_CMDS}
    while True:
        cmd = max(found, key=found.get)
        pos = found[cmd]
        if pos < 0:
            return None
        i = pos + len(cmd)
        if i < n and text[i].isalpha():  # "\boxedA" is another command: look further left
            found[cmd] = text.rfind(cmd, 0, pos)  # only this one moves, so the scan stays linear
            continue
        break
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        return _balanced_group(text, i, max_chars)
    if pos + len(cmd) < i < n:  # "\boxed 5": the token up to the next space or "$"
        j = i
        while j < n and j - i <= max_chars and text[j] not in " \t\n$":
            j += 1
        token = text[i:j].rstrip(".,")
        return token if token and j - i <= max_chars else None
    return None


_ANSWER_IS = re.compile(r"(?i)(?:final answer|the answer)\s*(?:is\b|:)")
_LAST_LINE_STRIP = " \t$*.:"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _last_match(regex: re.Pattern, text: str) -> re.Match | None:
    return next(iter(collections.deque(regex.finditer(text), maxlen=1)), None)


def _answer_is(text: str, max_chars: int) -> str | None:
    last = _last_match(_ANSWER_IS, text)
    if last is None:
        return None
    line = text[last.end() : last.end() + max_chars + 1].split("\n", 1)[0].strip(_LAST_LINE_STRIP)
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(a) and line.endswith(b):
            line = line[len(a) : -len(b)].strip(_LAST_LINE_STRIP)
    return line if 0 < len(line) <= max_chars else None


def _last_number(text: str, max_chars: int) -> str | None:
    last = _last_match(_NUMBER, text)
    return None if last is None or len(last[0]) > max_chars else last[0].replace(",", "")


def extract_answer(text: str, fallback: str = "boxed", max_chars: int = 1000) -> str | None:
    """The final answer string of a response per the fallback mode (see ``VerifierConfig``), or None."""
    if not isinstance(text, str):
        return None
    ans = last_boxed(text, max_chars)
    if ans is not None or fallback == "boxed":
        return ans
    if fallback == "answer_is":
        return _answer_is(text, max_chars)
    if fallback == "last_number":
        return _last_number(text, max_chars)
    raise ValueError(f"unknown fallback {fallback!r}")


# -------- Normalisation: only rules a measured MATH miss needed (each has a test) -----------------

# `\\` (row break) is consumed as a unit so "\\ " is not mistaken for the spacing command "\ ".
_SPACING = re.compile(r"(\\\\)|\\[,!;: ]|\\q?quad(?![A-Za-z])|~")
_CMD_SPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_WS = re.compile(r"\s+")
# The MATH targets were cleaned by turning "\text{June 20}" into "{June20}"; we map both to that form.
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm)\{")
_DEGREE = re.compile(r"\^\{?\\circ\}?")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
_PERCENT = re.compile(r"(?:\\?%)$")
_THOUSANDS = re.compile(r"(\d)\s*,\s*\\!\s*(?=\d{3}(?!\d))")
_LETTER_LIST = re.compile(r"[A-Za-z](?:,[A-Za-z])*")


def _strip_outer_braces(s: str) -> str:
    """``{{x}}`` -> ``x`` but ``{x}+{y}`` unchanged: strips leading braces whose partner is the
    symmetric trailing one. One pass over the brace tokens (no quadratic re-scan per layer)."""
    lead = len(s) - len(s.lstrip("{"))
    if not lead:
        return s
    partner: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKENS.finditer(s):
        if m[0] == "{":
            stack.append(m.start())
        elif m[0] == "}" and stack:
            opened = stack.pop()
            if opened < lead:
                partner[opened] = m.start()
    k = 0
    while k < lead and partner.get(k) == len(s) - 1 - k:
        k += 1
    return s[k : len(s) - k]


@functools.lru_cache(maxsize=16384)  # a gold answer is compared with G rollouts
def canonical_text(s: str) -> str:
    """A LaTeX-insignificant rewrite used for string equality (never for parsing).

    Removes white space and spacing commands (``\\!``, ``\\,``, ``~``...), turns ``\\text{..}`` /
    ``\\mbox{..}`` into ``{..}`` (the convention of the MATH targets), drops ``\\left``/``\\right``,
    degree signs and ``$``, maps ``\\dfrac``/``\\tfrac`` to ``\\frac``, strips outer braces and a
    trailing period. Case is kept. Linear-time regex passes only.
    """
    s = s.replace("\\$", "").replace("$", "")
    s = _SPACING.sub(lambda m: m.group(1) or " ", s)
    s = _CMD_SPACE.sub(lambda m: m.group(1) + "\0", s)  # keep "\pi r" distinct from "\pir"
    s = _WS.sub("", s).replace("\0", " ")
    s = _TEXT_CMD.sub("{", s)
    s = _DEGREE.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC.sub("\\\\frac", s)
    s = _strip_outer_braces(s).rstrip(".")
    return _strip_outer_braces(s)


def strip_percent(s: str) -> str | None:
    """``"44\\%"`` -> ``"44"``; None when there is no trailing percent sign.

    MATH targets write percentages without the sign (and math-verify parses no ``\\%`` inside
    ``$...$``), so a percentage is also compared without it.
    """
    t = s.rstrip().rstrip(".").rstrip()
    stripped = _PERCENT.sub("", t)
    return stripped.rstrip() if stripped != t else None


def percent_pairs(pred: str, gold: str) -> list[tuple[str, str]]:
    """The (pred, gold) forms to compare: as written, and with the trailing percent sign stripped
    from whichever side has one (MATH targets usually drop it, but some keep it). When both have one
    only the both-stripped pair is added, so "50\\%" never meets "0.5\\%" read as 0.5."""
    p, g = strip_percent(pred), strip_percent(gold)
    if p is None and g is None:
        return [(pred, gold)]
    return [(pred, gold), (pred if p is None else p, gold if g is None else g)]


def texts_match(pred: str, gold: str) -> bool:
    """String-level equality after ``canonical_text`` (with and without a trailing percent sign on
    either side), and unordered equality of letter choices (``\\text{D, A}`` == ``{A,D}``)."""
    for p, g in percent_pairs(pred, gold):
        c, cg = canonical_text(p), canonical_text(g)
        if not cg:
            continue
        if c == cg:
            return True
        if _LETTER_LIST.fullmatch(c) and _LETTER_LIST.fullmatch(cg):
            if sorted(c.split(",")) == sorted(cg.split(",")):
                return True
    return False


_FRAC_LITERAL = re.compile(r"(-?)\\frac(?:\{(\d{1,30})\}|(\d))(?:\{(\d{1,30})\}|(\d))")
_SLASH_LITERAL = re.compile(r"(-?\d{1,30})/(\d{1,30})")
_DECIMAL_LITERAL = re.compile(r"-?(?:\d{1,30}|\d{0,15}\.\d{1,15})")


def _number_literal(s: str) -> tuple[fractions.Fraction, bool] | None:
    """(value, exact) of an integer / decimal / ``\\frac{a}{b}`` / ``a/b`` literal in canonical form."""
    if m := _DECIMAL_LITERAL.fullmatch(s):
        return fractions.Fraction(s), "." not in s
    if m := _FRAC_LITERAL.fullmatch(s):
        num, den = int(m[2] or m[3]), int(m[4] or m[5])
        sign = -1 if m[1] else 1
    elif m := _SLASH_LITERAL.fullmatch(s):
        num, den, sign = int(m[1]), int(m[2]), 1
    else:
        return None
    return (fractions.Fraction(sign * num, den), True) if den else None


def _compare_literals(p: tuple[fractions.Fraction, bool], g: tuple[fractions.Fraction, bool]):
    if p[0] == g[0]:
        return True
    if (p[1] and g[1]) or abs(p[0] - g[0]) > fractions.Fraction(1, 10**5):
        return False
    return None  # decimals within math-verify's rounding of each other: it decides


def _number_values(s: str, stripped: str | None) -> list[tuple[fractions.Fraction, bool]]:
    """What a number answer may stand for: its literal; for a percentage ``p\\%`` (``stripped`` =
    p) both p and p/100."""
    out = [v] if (v := _number_literal(canonical_text(s))) is not None else []
    if stripped is not None and (q := _number_literal(canonical_text(stripped))) is not None:
        out += [q, (q[0] / 100, q[1])]
    return out


def quick_decision(pred: str, gold: str) -> bool | None:
    """Decides the common cases without sympy, exactly as math-verify would; None when it must decide.

    True on ``texts_match``. For number literals (integer, decimal, ``\\frac{a}{b}``, ``a/b``; a
    percentage ``p\\%`` on one side stands for p and p/100, on both sides the p are compared): True
    when equal; False when both are exact and differ, or differ by more than 1e-5 (math-verify
    compares floats rounded to 6 decimals, closer ones are left to it). Most wrong MATH answers are
    numbers: this keeps them off the workers.
    """
    if texts_match(pred, gold):
        return True
    ps, gs = strip_percent(pred), strip_percent(gold)
    if ps is not None and gs is not None:  # two percentages: their numbers, unscaled
        pred, gold, ps, gs = ps, gs, None, None
    golds = _number_values(gold, gs)
    if not golds:
        return None
    decisions = [_compare_literals(p, g) for p in _number_values(pred, ps) for g in golds]
    if True in decisions:
        return True
    return False if decisions and all(d is False for d in decisions) else None


def prepare_for_parse(s: str) -> str:
    """Rewrites applied before math-verify parses a string: ``111,\\!111`` -> ``111111`` (math-verify
    reads the comma as a separator of a tuple), a trailing period inside the box is dropped, and so
    are ``$`` (we add our own delimiters) and line breaks (inline math cannot span lines)."""
    s = s.replace("\\$", "").replace("$", "").replace("\n", " ")
    s = _THOUSANDS.sub(r"\1", s)
    return s.strip().rstrip(".").strip()


# -------- The judgement itself (runs in a worker's main thread; importable for direct tests) ------


@functools.lru_cache(maxsize=4096)
def _parse_latex(s: str, mv_timeout_s: int) -> tuple:
    # LaTeX path only: ExprExtractionConfig would run sympy.parse_expr (eval) on model text.
    from math_verify import LatexExtractionConfig, parse

    return tuple(parse("$" + s + "$", extraction_config=[LatexExtractionConfig()],
                       parsing_timeout=mv_timeout_s))


def judge_answer(pred: str, gold: str, *, mv_timeout_s: int = 2) -> bool:
    """True iff the extracted answer ``pred`` equals the ground truth ``gold``: ``quick_decision``,
    else math-verify on the parsed LaTeX of each of the ``percent_pairs``.
    Must run in a main thread (math-verify times out with signal.alarm)."""
    quick = quick_decision(pred, gold)
    if quick is not None:
        return quick
    from math_verify import verify

    for p, g in percent_pairs(pred, gold):
        gold_parsed = _parse_latex(prepare_for_parse(g), mv_timeout_s)
        if not gold_parsed:
            continue
        parsed = _parse_latex(prepare_for_parse(p), mv_timeout_s)
        if parsed and verify(list(gold_parsed), list(parsed), timeout_seconds=mv_timeout_s):
            return True
    return False
