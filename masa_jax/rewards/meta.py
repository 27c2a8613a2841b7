"""Meta-prediction parsing and the self-alignment reward (docs/method.md §2).

``parse(text)`` reads the JSON object a meta rollout emits after ``</meta>`` into a
``MetaPrediction(notions, pass_rate, length)``; a missing or bad field is None, and it never raises.
``self_alignment(...)`` turns predictions [P][M] plus the statistics of the G solution rollouts of
each problem into the length / difficulty / notion / total rewards, float32 [P, M].

Everything here treats model output as untrusted text: a linear-time brace scanner, bounded
candidate sizes and counts, ``json`` first and ``ast.literal_eval`` (never ``eval``) on a repaired
copy as the fallback.
"""
from __future__ import annotations

import ast
import bisect
import functools
import json
import logging
import math
import re
from typing import Mapping, NamedTuple, Sequence

import numpy as np

logger = logging.getLogger(__name__)

KEYS = ("math_notion", "pass_rate", "solution_length")
MAX_CANDIDATE_CHARS = 20_000  # a real meta JSON is < 2k characters
MAX_CANDIDATES_TRIED = 32
MAX_LITERAL_DEPTH = 32  # ast.literal_eval compiles recursively: keep hostile nesting away from it
# Most notions prompts.py writes into a hint or an expert meta. parse keeps any number of them:
# the candidate object is already bounded by MAX_CANDIDATE_CHARS.
MAX_NOTIONS = 64
MAX_NOTION_CHARS = 200


class MetaPrediction(NamedTuple):
    """One parsed meta rollout. ``pass_rate`` is a fraction in [0, 1]; each field None when absent."""

    notions: tuple[str, ...] | None
    pass_rate: float | None
    length: int | None


EMPTY = MetaPrediction(None, None, None)


# -------- Parsing ---------------------------------------------------------------------------------

_STRUCTURAL = re.compile(r"[{}\\]")
# Tokens of the brace scan: an escape pair (its second character is never structural), a string
# opener (a quote right after ``{ [ , :``, the only places a JSON / Python-literal string starts,
# so a quote in prose opens nothing), a bare quote or a brace.
_TOKENS = re.compile(r"""\\.|[{\[,:]\s*["']|["'{}]""", re.DOTALL)


def _scan_braces(text: str, strings: bool) -> list[tuple[int, int]]:
    """Balanced ``{...}`` spans (start, end) in one pass with an explicit stack (no recursion).

    Escaped characters never count, so LaTeX ``\\{`` in prose does not; unmatched braces are
    ignored, so a stray ``{`` in the reasoning does not hide the JSON object after it. With
    ``strings``, braces inside a quoted string of an open object are skipped too (the JSON text
    ``"\\\\left\\\\{"`` holds a real, unmatched brace).
    """
    stack: list[int] = []
    spans: list[tuple[int, int]] = []
    quote = ""  # the delimiter of the string being read, "" outside strings
    for m in _TOKENS.finditer(text):  # one C-speed pass over the structural tokens only
        tok = m.group()
        if tok[0] == "\\":
            continue
        if quote:
            if tok[-1] == quote:
                quote = ""
            continue
        if tok[0] == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            spans.append((stack.pop(), m.end()))
        if strings and stack and len(tok) > 1:
            quote = tok[-1]
    return spans


def _brace_candidates(text: str) -> set[tuple[int, int]]:
    """Spans of both scans: the string-aware one loses the object when a stray brace and quote in
    prose flip its string state, the plain one when a string holds an unmatched brace; a wrong
    span just fails to parse."""
    return set(_scan_braces(text, True)) | set(_scan_braces(text, False))


def braces_balanced(text: str) -> bool:
    """True when the plain (string-unaware) brace scan sees no unmatched brace in ``text``."""
    depth = 0
    escaped = -1
    for m in _STRUCTURAL.finditer(text):
        i = m.start()
        if i == escaped:
            continue
        c = text[i]
        if c == "\\":
            escaped = i + 1
        else:
            depth += 1 if c == "{" else -1
            if depth < 0:
                return False
    return depth == 0


_JSON_ESCAPES = set('"\\/bfnrtu')


def _repair_backslashes(s: str) -> str:
    """Doubles every backslash that JSON would misread: LaTeX commands (``\\frac`` would become a
    form feed + "rac", ``\\theta`` a tab + "heta") and invalid escapes (``\\{``, ``\\,``). Kept as
    escapes: ``\\\\``, ``\\"``, ``\\/``, ``\\uXXXX`` and a one-letter ``\\n``-style escape that is not
    followed by another letter."""
    out = []
    i, n = 0, len(s)
    while i < n:
        j = s.find("\\", i)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        nxt = s[j + 1] if j + 1 < n else ""
        after = s[j + 2] if j + 2 < n else ""
        if nxt in ('"', "\\", "/"):
            out.append(s[j : j + 2])
            i = j + 2
            continue
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[j + 2 : j + 6]):
            keep = True
        else:
            keep = nxt in _JSON_ESCAPES and nxt != "u" and not after.isalpha()
        out.append("\\" if keep else "\\\\")
        i = j + 1
    return "".join(out)


_TRAILING_COMMA = re.compile(r",\s*([}\]])")
# An integer literal longer than any notion is out of range of every field, and past
# sys.get_int_max_str_digits() json / ast refuse the whole object for it. Rewritten as a float
# literal (no digit limit; it reads as +-inf) it voids only its own field; a digit run this long
# inside a string leaves that string a too-long notion either way.
_LONG_INT = re.compile(r"(?<![\w.])(\d{%d,})(?![\w.])" % (MAX_NOTION_CHARS + 1))


def _max_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "[{(":
            depth += 1
            best = max(best, depth)
        elif c in "]})":
            depth -= 1
    return best


def _load_object(candidate: str) -> dict | None:
    """json on the repaired text, then without trailing commas, then ``ast.literal_eval`` (single
    quotes); None if all fail or the result is not a dict."""
    repaired = _LONG_INT.sub(r"\1.0", _repair_backslashes(candidate))
    no_trailing = _TRAILING_COMMA.sub(r"\1", repaired)
    for attempt in (repaired, no_trailing):
        try:
            obj = json.loads(attempt)
        except (ValueError, RecursionError):
            continue
        return obj if isinstance(obj, dict) else None
    if _max_depth(repaired) > MAX_LITERAL_DEPTH:
        return None
    try:
        obj = ast.literal_eval(repaired)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _finite_number(x) -> float | None:
    """A finite float from an int / float / numeric or "a/b" string; None otherwise (bools too)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, str):
        s = x.strip()
        if len(s) > 40:
            return None
        try:
            if "/" in s:
                num, den = s.split("/", 1)
                v = float(num) / float(den)
            else:
                v = float(s)
        except (ValueError, ZeroDivisionError):
            return None
    elif isinstance(x, (int, float)):
        try:
            v = float(x)
        except OverflowError:  # a 5000-digit int
            return None
    else:
        return None
    return v if math.isfinite(v) else None


def _pass_rate(x, k: int) -> float | None:
    v = _finite_number(x)
    if v is None:
        return None
    if isinstance(x, str) and "/" in x:  # "5/8": already a fraction
        return v if 0.0 <= v <= 1.0 else None
    if v == int(v):  # an integer count of the K attempts (0 and 1 included)
        return v / k if 0 <= v <= k else None
    return v if 0.0 < v < 1.0 else None  # a non-integer value in [0, 1] is a fraction


def _length(x, lo: int, hi: int) -> int | None:
    v = _finite_number(x)
    if v is None or v != int(v):
        return None
    v = int(v)
    return v if lo <= v <= hi else None


def _notions(x) -> tuple[str, ...] | None:
    if isinstance(x, str):
        x = x.split(",")
    if not isinstance(x, (list, tuple)):
        return None
    if not all(isinstance(s, str) for s in x):
        return None
    return tuple(s.strip() for s in x if s.strip() and len(s) <= MAX_NOTION_CHARS)


# The key names the meta prompt asks for (prompts.META_TEMPLATE), recognised whatever their case
# and separators ("Pass Rate", "pass-rate", "passRate") and with "math_notions" plural too.
_KEY_NAMES = {"mathnotion": "math_notion", "mathnotions": "math_notion", "passrate": "pass_rate",
              "solutionlength": "solution_length"}
_KEY_SEPARATORS = re.compile(r"[\W_]+")
_KEY_MENTION = re.compile(r"(?i)math[\W_]*notion|pass[\W_]*rate|solution[\W_]*length")


def _normalise_key(key) -> str:
    """The ``KEYS`` name ``key`` spells, or "" for any other key."""
    return _KEY_NAMES.get(_KEY_SEPARATORS.sub("", key.lower()), "") if isinstance(key, str) else ""


def parse(text: str, *, k: int = 8, min_length: int = 1, max_length: int = 10**6) -> MetaPrediction:
    """Reads the last well-formed JSON object (with at least one of ``KEYS``, in any case and with
    any separators: "Pass Rate", "passRate") after the last ``</meta>`` (in the whole text when
    there is none) into a ``MetaPrediction``.

    ``pass_rate``: an integer 0..k (integral float / numeric string too) -> count / k; a non-integer
    in (0, 1) or an "a/b" string in [0, 1] is taken as the fraction itself. ``solution_length``: an
    integer in [min_length, max_length] (integral float accepted). ``math_notion``: a list of any
    number of strings, or one comma-separated string. A missing / mistyped / non-finite / out-of-range field
    is None. Linear in ``len(text)``; never raises.
    """
    if not isinstance(text, str):
        return EMPTY
    try:
        return _parse(text, k, min_length, max_length)
    except Exception:  # a parser bug must cost one reward, not the training step; log it loudly
        logger.exception("meta.parse failed on a %d-character text", len(text))
        return EMPTY


def _parse(text: str, k: int, min_length: int, max_length: int) -> MetaPrediction:
    tag = text.rfind("</meta>")
    region = text[tag + len("</meta>") :] if tag >= 0 else text
    key_pos = [m.start() for m in _KEY_MENTION.finditer(region)]  # a candidate must hold one
    if not key_pos:
        return EMPTY
    spans = []
    for start, end in _brace_candidates(region):
        hit = bisect.bisect_right(key_pos, start)
        if hit < len(key_pos) and key_pos[hit] < end and end - start <= MAX_CANDIDATE_CHARS:
            spans.append((start, end))
    spans.sort(key=lambda se: (-se[1], se[0]))  # last to close first; outermost first on ties
    for start, end in spans[:MAX_CANDIDATES_TRIED]:
        obj = _load_object(region[start:end])
        if obj is None:
            continue
        fields = {_normalise_key(key): val for key, val in obj.items()}
        if not any(key in fields for key in KEYS):
            continue
        return MetaPrediction(
            notions=_notions(fields["math_notion"]) if "math_notion" in fields else None,
            pass_rate=_pass_rate(fields["pass_rate"], k) if "pass_rate" in fields else None,
            length=(_length(fields["solution_length"], min_length, max_length)
                    if "solution_length" in fields else None),
        )
    return EMPTY


# -------- Notion matching -------------------------------------------------------------------------
_INVARIANT_PLURALS = frozenset({"series", "species"})
_OE_PLURALS = frozenset({"aloes", "canoes", "floes", "foes", "hoes", "oboes", "shoes", "throes", "toes",
                         "tiptoes", "woes"})  # of nouns in -oe; other "-oes" plurals are of -o nouns


def singularise(word: str) -> str:
    """Singular of a regular English plural: identities->identity, boxes->box, zeroes->zero,
    medians->median; words ending in "ss" / "us" / "is", "series" and short words are left alone."""
    w = word
    if len(w) <= 3 or w in _INVARIANT_PLURALS or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes")):
        return w[:-2]
    if w.endswith("oes") and w not in _OE_PLURALS:
        return w[:-2]
    return w[:-1]


@functools.lru_cache(maxsize=65536)
def normalise_notion(notion: str) -> str:
    """Lower-case, white space collapsed, stripped, last word singularised."""
    words = notion.lower().split()
    if not words:
        return ""
    words[-1] = singularise(words[-1])
    return " ".join(words)


@functools.lru_cache(maxsize=65536)
def _notion_matcher(notion: str) -> tuple[str, re.Pattern | None, bool]:
    """(first word, compiled pattern of the rest with ``\\s+`` between words or None, whether the
    start needs a word boundary): one compile per unique normalised notion."""
    head, *rest = notion.split(" ")
    pattern = re.compile("".join(r"\s+" + re.escape(w) for w in rest)) if rest else None
    return head, pattern, head[:1].isalnum() or head[:1] == "_"


def occurs(notion: str, text: str) -> bool:
    """Does normalised ``notion`` occur in lower-cased ``text`` starting at a word boundary?

    The match may run into a longer word ("power" occurs in "powers") but may not start inside one
    ("sum" does not occur in "consume"); any white space run matches a space of the notion. The
    first word is located with ``str.find`` (C speed; a regex with a look-behind is ~20x slower),
    the rest is a compiled ``match`` at that spot.
    """
    if not notion:
        return False
    head, rest, check_boundary = _notion_matcher(notion)
    i = text.find(head)
    while i >= 0:
        if ((not check_boundary or i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
                and (rest is None or rest.match(text, i + len(head)))):
            return True
        i = text.find(head, i + 1)
    return False


def _positive_notions(notions, problem_text, solution_texts, correct_row, cache) -> float:
    """r_notion of one prediction: mean over kept notions of 1[count(n) > 0], 0 if none is kept."""
    kept = []
    for raw in notions or ():
        n = normalise_notion(raw)
        if n and n not in kept:
            kept.append(n)
    hits = []
    for n in kept:
        if n not in cache:  # once per (notion, solution) pair of this problem
            if occurs(n, problem_text):
                cache[n] = None  # named in the problem: excluded
            else:
                count = sum((1 if ok else -1) for sol, ok in zip(solution_texts, correct_row)
                            if occurs(n, sol))
                cache[n] = count > 0
        if cache[n] is not None:
            hits.append(cache[n])
    return sum(hits) / len(hits) if hits else 0.0


# -------- Self-alignment reward -------------------------------------------------------------------

class MetaRewardInputs(NamedTuple):
    """What a reward component scores: the parsed predictions and their [P, M] numeric fields, next to
    the problems and the G solution rollouts that the predictions are checked against."""

    preds: list[list[MetaPrediction]]   # [P][M]
    pass_pred: np.ndarray               # float64 [P, M]: predicted pass rate, NaN where unparsed
    len_pred: np.ndarray                # float64 [P, M]: predicted solution length, NaN where unparsed
    problems: Sequence[str]             # [P]
    solutions: Sequence[Sequence[str]]  # [P][G]
    correct: np.ndarray                 # bool [P, G]
    lengths: np.ndarray                 # int [P, G]
    base: float                         # b of the difficulty reward


class RewardComponent(NamedTuple):
    """One part of the self-alignment reward: ``fn(inputs) -> float [P, M]`` in [0, 1] (NaN counts 0),
    and its weight in the total by default (``config.meta.weights`` overrides, in registry order)."""

    name: str
    fn: object
    weight: float


def length_reward(x: MetaRewardInputs) -> np.ndarray:
    """r_len: 1 when the predicted length lies in the inclusive [min, max] of the correct rollouts'
    lengths; 0 for a missing prediction or a problem with no correct rollout."""
    lens = x.lengths.astype(np.float64)
    lo = np.where(x.correct, lens, np.inf).min(axis=1, initial=np.inf)[:, None]
    hi = np.where(x.correct, lens, -np.inf).max(axis=1, initial=-np.inf)[:, None]
    return ((x.len_pred >= lo) & (x.len_pred <= hi)).astype(np.float64)


def difficulty_reward(x: MetaRewardInputs) -> np.ndarray:
    """r_diff = b ** |d_pred - d_sol| (d_sol: the problem's solution pass rate); 0 when missing."""
    P = x.correct.shape[0]
    d_sol = x.correct.mean(axis=1, keepdims=True) if x.correct.shape[1] else np.zeros((P, 1))
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x.pass_pred), 0.0, np.power(x.base, np.abs(x.pass_pred - d_sol)))


def notion_reward(x: MetaRewardInputs) -> np.ndarray:
    """r_notion: the share of predicted notions (those not named in the problem) that occur in more
    correct than incorrect solutions; string matching once per (notion, solution) pair of a problem."""
    P, M = x.len_pred.shape
    r = np.zeros((P, M), dtype=np.float64)
    for p in range(P):
        if not any(pred.notions for pred in x.preds[p]):
            continue
        problem_text = (x.problems[p] or "").lower()
        solution_texts = [(s or "").lower() for s in x.solutions[p]]
        cache: dict[str, bool | None] = {}
        for j, pred in enumerate(x.preds[p]):
            r[p, j] = _positive_notions(pred.notions, problem_text, solution_texts, x.correct[p], cache)
    return r


# The components in order: the order of config.meta.weights, the metrics `reward/meta_<name>`, the
# logged samples' `reward_<name>`. A new component is one `register_component` call and its function.
COMPONENTS: dict[str, RewardComponent] = {
    c.name: c for c in (RewardComponent("length", length_reward, 1 / 3),
                        RewardComponent("difficulty", difficulty_reward, 1 / 3),
                        RewardComponent("notion", notion_reward, 1 / 3))}


def register_component(component: RewardComponent) -> None:
    """Adds a reward component after the others (before the run config is built: its weight joins
    `default_weights()`)."""
    if component.name in COMPONENTS or component.name == "total":
        raise ValueError(f"meta reward component {component.name!r} exists already")
    COMPONENTS[component.name] = component


def component_names() -> tuple[str, ...]:
    return tuple(COMPONENTS)


def default_weights() -> tuple[float, ...]:
    return tuple(c.weight for c in COMPONENTS.values())


def self_alignment(
    preds: Sequence[Sequence[MetaPrediction | str]],
    problems: Sequence[str],
    solutions: Sequence[Sequence[str]],
    correct,
    lengths,
    base: float = 0.01,
    *,
    k: int = 8,
    weights: Mapping[str, float] | Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Self-alignment rewards of every meta rollout (docs/method.md §2).

    Args:
      preds: [P][M] ``MetaPrediction`` (or raw meta texts, parsed here with ``k``; None = unparsed).
      problems: [P] problem texts (without the instruction).
      solutions: [P][G] solution rollout texts.
      correct: bool [P, G] solution correctness.
      lengths: int [P, G] solution token lengths.
      base: b in r_diff = b ** |d_pred - d_sol|.
      weights: the components' weights in the total (default: theirs, 1/3 each for length, difficulty,
        notion: the mean); a mapping by name (a missing name weighs 0) or a sequence in `COMPONENTS` order.
    Returns: dict of float32 [P, M]: one entry per component ("length", "difficulty", "notion") and
      "total" (all in [0, 1] for weights that sum to 1).
    """
    correct = np.asarray(correct, dtype=bool)
    lengths = np.asarray(lengths)
    P = len(preds)
    if correct.ndim != 2 or correct.shape[0] != P or lengths.shape != correct.shape:
        raise ValueError(f"correct {correct.shape} and lengths {lengths.shape} must be [P={P}, G]")
    if len(problems) != P or len(solutions) != P or any(len(s) != correct.shape[1] for s in solutions):
        raise ValueError("problems must be [P] and solutions [P][G] like correct")
    M = len(preds[0]) if P else 0
    if any(len(row) != M for row in preds):
        raise ValueError("preds must be rectangular [P][M]")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"base must be in [0, 1], got {base}")
    w = _weights(weights)
    preds = [[parse(x, k=k) if isinstance(x, str) else EMPTY if x is None else x for x in row]
             for row in preds]
    nan = float("nan")
    inputs = MetaRewardInputs(
        preds=preds,
        pass_pred=np.array([[nan if p.pass_rate is None else p.pass_rate for p in row] for row in preds],
                           dtype=np.float64).reshape(P, M),
        len_pred=np.array([[nan if p.length is None else p.length for p in row] for row in preds],
                          dtype=np.float64).reshape(P, M),
        problems=problems, solutions=solutions, correct=correct, lengths=lengths, base=base)
    parts = {name: np.nan_to_num(np.asarray(c.fn(inputs), np.float64).reshape(P, M), nan=0.0)
             for name, c in COMPONENTS.items()}
    total = sum((w[i] * arr for i, arr in enumerate(parts.values())), np.zeros((P, M)))
    return {name: arr.astype(np.float32) for name, arr in (*parts.items(), ("total", total))}


def _weights(weights) -> tuple[float, ...]:
    names = component_names()
    if weights is None:
        return default_weights()
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"unknown reward weights {sorted(unknown)}: the components are {list(names)}")
        return tuple(float(weights.get(name, 0.0)) for name in names)
    w = tuple(float(x) for x in weights)
    if len(w) != len(names):
        raise ValueError(f"weights must be {len(names)} numbers, one per component {names}, got {w}")
    return w
