"""The toy world: procedurally generated integer-arithmetic problems with worked solutions.

A CPU-sized task on which a 1-5 M parameter Qwen3-architecture model can show MASA's phenomena:
problems span trivial to hard (so pass rates vary), every problem has a known answer, and every
worked solution names the notions it uses, so notion predictions can be checked.

    question (≲ 40 chars)    Compute (37+5)*4-12.
    solution (≲ 200 chars)   parentheses first\nadd 37+5=42 carry\nmultiply 42*4=168\n
                             subtract 168-12=156\n\\boxed{156}

Difficulty levels 1..5 (`LEVELS`) go from "Compute 3+4." (one-digit addition) through one-digit
subtraction and multiplication (2), a two-digit operand (3) and three operands with parentheses (4) to
four two-digit operands (5). Each level draws only questions the level below could not have drawn.
The solution format and the notions are defined in `masa_jax.toy.solver` (re-exported here: `solve`,
`notions_of`, `NOTIONS`).

Everything is a pure function of (seed, index): `problem_at(i, seed, mix)` is random access, so the
training stream is an unbounded grain source (`source`) with a trivially checkpointable position;
`heldout(n, seed)` is a fixed evaluation set in its own random namespace. Specs for config files:
"toy:<n>[:<mix>]" (the first n training problems) and "toy-heldout:<n>[:<seed>]" (`load_spec`).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from typing import Iterator, Mapping, Sequence, Union

from masa_jax.data.problem import Problem
from masa_jax.toy.solver import (  # noqa: F401  (re-exported)
    NOTIONS,
    QUESTION_PREFIX,
    QUESTION_SUFFIX,
    VERBS,
    Step,
    Worked,
    expression_of,
    notions_of,
    parse_expression,
    solve,
    steps_of,
    strip_parens,
)


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """How a difficulty level draws a problem.

    n_operands, digits: inclusive (min, max) ranges, drawn per problem / per operand.
    ops: operator alphabet. max_parens / paren_prob: up to max_parens parenthesised groups, each
    attempted with probability paren_prob (redundant ones, e.g. "(3*4)+5", are never written).
    mul_cap: every multiplication step has min(|a|, |b|) ≤ mul_cap (keeps products learnable).
    max_abs: every intermediate result and the answer satisfy |value| ≤ max_abs.
    """

    n_operands: tuple[int, int]
    digits: tuple[int, int]
    ops: str
    max_parens: int
    paren_prob: float
    mul_cap: int
    max_abs: int


LEVELS: Mapping[int, LevelSpec] = {
    1: LevelSpec((2, 2), (1, 1), "+", 0, 0.0, 0, 18),  # "Compute 3+4."
    2: LevelSpec((2, 2), (1, 1), "+-*", 0, 0.0, 9, 81),  # "Compute 3-7.", "Compute 6*8."
    3: LevelSpec((2, 2), (1, 2), "+-*", 0, 0.0, 9, 999),  # "Compute 47-9."
    4: LevelSpec((3, 3), (1, 2), "+-*", 1, 0.4, 9, 9_999),  # "Compute (12+7)*3."
    5: LevelSpec((4, 4), (2, 2), "+-*", 1, 0.5, 99, 99_999),  # "Compute 45-(12+38)*17."
}
MIN_LEVEL, MAX_LEVEL = min(LEVELS), max(LEVELS)

# --------------------------------------------------------------------------- generation


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(1, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def _render(nums: Sequence[int], ops: Sequence[str], spans: Sequence[tuple[int, int]]) -> str:
    opens = [sum(1 for i, _ in spans if i == k) for k in range(len(nums))]
    closes = [sum(1 for _, j in spans if j == k) for k in range(len(nums))]
    parts = []
    for k, n in enumerate(nums):
        if k:
            parts.append(ops[k - 1])
        parts.append("(" * opens[k] + str(n) + ")" * closes[k])
    return "".join(parts)


def _compatible(span: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    i, j = span
    for a, b in spans:
        if (i, j) == (a, b):
            return False
        nested = (a <= i and j <= b) or (i <= a and b <= j)
        disjoint = j < a or b < i
        if not (nested or disjoint):
            return False
    return True


def _draw_spans(rng: random.Random, nums: Sequence[int], ops: Sequence[str], spec: LevelSpec) -> list[tuple[int, int]]:
    n = len(nums)
    spans: list[tuple[int, int]] = []
    for _ in range(spec.max_parens):
        if rng.random() >= spec.paren_prob:
            continue
        for _attempt in range(8):
            i = rng.randint(0, n - 2)
            j = rng.randint(i + 1, n - 1)
            span = (i, j)
            if (i, j) == (0, n - 1) or not _compatible(span, spans):
                continue
            # Keep a group only if it changes the parse: "(3*4)+5" teaches nothing.
            with_it = strip_parens(parse_expression(_render(nums, ops, spans + [span])))
            without = strip_parens(parse_expression(_render(nums, ops, spans)))
            if with_it != without:
                spans.append(span)
                break
    return spans


def _within_limits(steps: Sequence[Step], spec: LevelSpec) -> bool:
    for s in steps:
        if abs(s.result) > spec.max_abs:
            return False
        if s.op == "*" and min(abs(s.a), abs(s.b)) > spec.mul_cap:
            return False
    return True


def _fits(
    nums: Sequence[int], ops: Sequence[str], spans: Sequence[tuple[int, int]], steps: Sequence[Step], spec: LevelSpec
) -> bool:
    """Whether `spec` could have drawn this question."""
    return (
        spec.n_operands[0] <= len(nums) <= spec.n_operands[1]
        and all(spec.digits[0] <= len(str(n)) <= spec.digits[1] for n in nums)
        and set(ops) <= set(spec.ops)
        and len(spans) <= spec.max_parens
        and _within_limits(steps, spec)
    )


def generate_question(level: int, rng: random.Random) -> str:
    """Draws one question of difficulty `level` (1..5) from `rng`; deterministic given its state.

    Rejection-samples until the level's limits hold (max |value|, multiplication cap) and the
    question is one the level below could not have drawn.
    """
    spec = LEVELS[level]
    for _ in range(1000):
        n = rng.randint(*spec.n_operands)
        nums = [_number(rng, spec.digits) for _ in range(n)]
        ops = [rng.choice(spec.ops) for _ in range(n - 1)]
        spans = _draw_spans(rng, nums, ops, spec)
        question = QUESTION_PREFIX + _render(nums, ops, spans) + QUESTION_SUFFIX
        steps, _ = steps_of(parse_expression(expression_of(question)))
        if not _within_limits(steps, spec):
            continue
        # A question the level below can also draw ("3+4" at level 2) would blur the labels.
        easier = LEVELS.get(level - 1)
        if easier is not None and _fits(nums, ops, spans, steps, easier):
            continue
        return question
    raise RuntimeError(f"level {level}: no question within limits after 1000 draws")  # pragma: no cover


DifficultyMix = Union[int, Sequence[float], Mapping[int, float], None]


def _mix_table(mix: DifficultyMix) -> tuple[tuple[int, float], ...]:
    """Normalised (level, cumulative probability) pairs. None = uniform over all levels."""
    if mix is None:
        weights = {lvl: 1.0 for lvl in LEVELS}
    elif isinstance(mix, int):
        weights = {mix: 1.0}
    elif isinstance(mix, Mapping):
        weights = {int(k): float(v) for k, v in mix.items()}
    else:
        if len(mix) != len(LEVELS):
            raise ValueError(f"a weight sequence needs {len(LEVELS)} entries (levels {MIN_LEVEL}..{MAX_LEVEL})")
        weights = {MIN_LEVEL + i: float(w) for i, w in enumerate(mix)}
    for lvl, w in weights.items():
        if lvl not in LEVELS:
            raise ValueError(f"unknown difficulty level {lvl}; levels are {MIN_LEVEL}..{MAX_LEVEL}")
        if not w >= 0:
            raise ValueError(f"level {lvl}: weight must be >= 0, got {w}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("difficulty mix has no positive weight")
    cum, table = 0.0, []
    for lvl in sorted(weights):
        if weights[lvl] > 0:
            cum += weights[lvl] / total
            table.append((lvl, cum))
    return tuple(table)


def _pick_level(table: tuple[tuple[int, float], ...], u: float) -> int:
    for lvl, c in table:
        if u < c:
            return lvl
    return table[-1][0]  # u ≈ 1 with rounding in the cumulative sum


def make_problem(question: str, *, uid: str, source: str, row: int, difficulty: int) -> Problem:
    """Wraps a toy question into a Problem with its answer and worked solution."""
    worked = solve(question)
    return Problem(
        uid=uid,
        question=question,
        answer=str(worked.answer),
        solution=worked.text,
        source=source,
        row=row,
        difficulty=difficulty,
    )


def problem_at(index: int, seed: int = 0, difficulty_mix: DifficultyMix = None) -> Problem:
    """Problem number `index` of the training stream `seed` (random access, pure).

    Its level is drawn from `difficulty_mix` (an int level, 5 weights for levels 1..5, a
    {level: weight} mapping, or None for uniform). uid "toy-<seed>:<index>", source "toy:stream".
    """
    table = _mix_table(difficulty_mix)
    # String seeds go through SHA-512 in `random`, so they are stable across processes and runs.
    rng = random.Random(f"masa-toy/stream/{seed}/{index}")
    level = _pick_level(table, rng.random())
    return make_problem(
        generate_question(level, rng), uid=f"toy-{seed}:{index}", source="toy:stream", row=index, difficulty=level
    )


class ToySource(Sequence[Problem]):
    """Unbounded random-access training stream for grain: len() is sys.maxsize, item i = problem_at(i)."""

    def __init__(self, seed: int = 0, difficulty_mix: DifficultyMix = None):
        _mix_table(difficulty_mix)  # validate eagerly
        self.seed = seed
        self.difficulty_mix = difficulty_mix

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("ToySource is unbounded; index it with integers")
        index = int(index)
        if index < 0:
            raise IndexError("ToySource is unbounded; negative indices are undefined")
        return problem_at(index, self.seed, self.difficulty_mix)

    def __iter__(self) -> Iterator[Problem]:
        i = 0
        while True:
            yield self[i]
            i += 1


def source(seed: int = 0, difficulty_mix: DifficultyMix = None) -> ToySource:
    """The training stream as a random-access source for `masa_jax.data.pipeline.batches`."""
    return ToySource(seed, difficulty_mix)


def stream(seed: int = 0, difficulty_mix: DifficultyMix = None) -> Iterator[Problem]:
    """Unbounded iterator over the training stream: problem_at(0), problem_at(1), ..."""
    return iter(ToySource(seed, difficulty_mix))


def heldout(n: int, seed: int = 1234, levels: Sequence[int] = tuple(LEVELS)) -> tuple[Problem, ...]:
    """A fixed evaluation set of `n` distinct problems, levels cycled evenly (1, 2, ..., 5, 1, ...).

    Drawn from its own random namespace, so it never shifts with the training stream. Level 1 has
    only 81 questions and level 2 162, so with n > 405 level-1 questions repeat; levels 1-2 overlap the
    training stream by design, level 3 a little (~6 % of its held-out questions are among the first
    3000 training problems), from level 4 on negligibly; a run that evaluates on them (config
    `eval.files`) drops those questions from its training problems. uid "toy-heldout-<seed>:<i>",
    source "toy:heldout".
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for lvl in levels:
        if lvl not in LEVELS:
            raise ValueError(f"unknown difficulty level {lvl}")
    seen: set[str] = set()
    out: list[Problem] = []
    for i in range(n):
        level = levels[i % len(levels)]
        rng = random.Random(f"masa-toy/heldout/{seed}/{i}")
        question = generate_question(level, rng)
        for _ in range(1000):  # bounded: a small level may have run out of new questions
            if question not in seen:
                break
            question = generate_question(level, rng)
        seen.add(question)
        out.append(
            make_problem(question, uid=f"toy-heldout-{seed}:{i}", source="toy:heldout", row=i, difficulty=level)
        )
    return tuple(out)


# --------------------------------------------------------------------------- config specs


def _parse_mix(text: str) -> DifficultyMix:
    parts = [x for x in text.split(",") if x.strip()]
    try:
        if len(parts) == 1:
            return int(parts[0])
        return tuple(float(x) for x in parts)
    except ValueError:
        raise ValueError(f"bad difficulty mix {text!r}: a level ('3') or 5 weights ('1,1,2,2,1')") from None


def load_spec(spec: str, seed: int = 0) -> list[Problem]:
    """Problems named by a config string.

    "toy:<n>[:<mix>]": the first n problems of the training stream `seed`; mix is one level ("3")
      or five weights for levels 1..5 ("1,1,2,2,1"); default uniform.
    "toy-heldout:<n>[:<seed>]": heldout(n, seed), default seed 1234 (the `seed` argument is not used,
      so evaluation sets do not move with the training seed).
    Raises ValueError on anything else.
    """
    kind, _, rest = spec.partition(":")
    fields = rest.split(":") if rest else []
    try:
        n = int(fields[0])
    except (IndexError, ValueError):
        raise ValueError(f"bad toy spec {spec!r}: expected toy:<n>[:<mix>] or toy-heldout:<n>[:<seed>]") from None
    if kind == "toy" and len(fields) <= 2:
        mix = _parse_mix(fields[1]) if len(fields) == 2 else None
        src = ToySource(seed, mix)
        return [src[i] for i in range(n)]
    if kind == "toy-heldout" and len(fields) <= 2:
        return list(heldout(n, int(fields[1]) if len(fields) == 2 else 1234))
    raise ValueError(f"bad toy spec {spec!r}: expected toy:<n>[:<mix>] or toy-heldout:<n>[:<seed>]")


def training_problems(spec: str, seed: int = 0) -> list[Problem]:
    """`load_spec` for the trainer's `data.train_files` entries ("toy:20000", "toy:20000:1,1,2,2,1")."""
    return load_spec(spec, seed)
