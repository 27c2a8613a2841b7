"""The toy world: procedurally generated integer-arithmetic problems with worked solutions.

A CPU-sized task on which a 1-5 M parameter Qwen3-architecture model can show MASA's phenomena:
problems span trivial to hard (so pass rates vary), every problem has a known answer, and every
worked solution names the notions it uses, so notion predictions can be checked.

Problem text (≲ 40 characters):      Compute (37+5)*4-12.
Worked solution (≲ 200 characters):  parentheses first
                                     add 37+5=42 carry
                                     multiply 42*4=168
                                     subtract 168-12=156
                                     \\boxed{156}

Solution format, one step per line, always in this order:
  * "parentheses first" when the question has parentheses; groups are evaluated innermost first,
    left to right, then the rest of the expression;
  * "<verb> <a><op><b>=<result>[ carry| borrow][ negative]" with verb add / subtract / multiply,
    a negative right operand written "(-7)", steps in precedence order (post-order of the parse
    tree, so multiplication before the addition that needs it);
  * "\\boxed{<answer>}".
Tags: "carry" when the step is (in magnitude) a column addition with a carry, "borrow" when it is a
column subtraction with a borrow (so "add -5+12=7 borrow": 12-5 borrows), "negative" when the
result is below zero. Multiplication gets no carry tag: it is one memorised operation here.

Notions (`NOTIONS`): parentheses, add, subtract, multiply, carry, borrow, negative. None of these
words occurs in a question, so the meta reward never excludes a true notion as "already named".

Everything is a pure function of (seed, index): `problem_at(i, seed, mix)` is random access, so the
training stream is an unbounded grain source with a trivially checkpointable position.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from typing import Iterator, Mapping, Sequence, Union

from masa_jax.data.sources import Problem

NOTIONS: tuple[str, ...] = ("parentheses", "add", "subtract", "multiply", "carry", "borrow", "negative")
VERBS: Mapping[str, str] = {"+": "add", "-": "subtract", "*": "multiply"}
QUESTION_PREFIX = "Compute "
QUESTION_SUFFIX = "."
PARENTHESES_LINE = "parentheses first"
_MAX_PAREN_DEPTH = 16
_MAX_QUESTION_CHARS = 200


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
    2: LevelSpec((2, 2), (1, 2), "+-*", 0, 0.0, 9, 999),  # "Compute 47-9."
    3: LevelSpec((3, 3), (1, 2), "+-*", 1, 0.4, 9, 9_999),  # "Compute (12+7)*3."
    4: LevelSpec((4, 4), (2, 2), "+-*", 1, 0.5, 99, 99_999),  # "Compute 45-(12+38)*7."
    5: LevelSpec((5, 5), (2, 3), "+-*", 2, 0.6, 99, 999_999),  # "Compute (123-45)*(67+8)-910."
}
MIN_LEVEL, MAX_LEVEL = min(LEVELS), max(LEVELS)

# --------------------------------------------------------------------------- expressions


@dataclasses.dataclass(frozen=True)
class Num:
    value: int
    paren: bool = False


@dataclasses.dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    paren: bool = False  # written inside parentheses in the question


Expr = Union[Num, BinOp]


def _strip_parens(e: Expr) -> Expr:
    if isinstance(e, Num):
        return Num(e.value)
    return BinOp(e.op, _strip_parens(e.left), _strip_parens(e.right))


def parse_expression(text: str) -> Expr:
    """Parses "<int>[op <int>]..." with + - * and parentheses (no unary minus, no spaces).

    Usual precedence, left associative. Raises ValueError on anything else.
    """
    pos = 0
    depth = 0

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def factor() -> Expr:
        nonlocal pos, depth
        c = peek()
        if c == "(":
            depth += 1
            if depth > _MAX_PAREN_DEPTH:
                raise ValueError(f"parentheses nested deeper than {_MAX_PAREN_DEPTH}")
            pos += 1
            inner = expr()
            if peek() != ")":
                raise ValueError(f"expected ')' at {pos} in {text!r}")
            pos += 1
            depth -= 1
            return dataclasses.replace(inner, paren=True)
        start = pos
        while peek().isdigit() and peek().isascii():
            pos += 1
        if start == pos:
            raise ValueError(f"expected a number at {pos} in {text!r}")
        return Num(int(text[start:pos]))

    def term() -> Expr:
        nonlocal pos
        node = factor()
        while peek() == "*":
            pos += 1
            node = BinOp("*", node, factor())
        return node

    def expr() -> Expr:
        nonlocal pos
        node = term()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            node = BinOp(op, node, term())
        return node

    if not text or len(text) > _MAX_QUESTION_CHARS:
        raise ValueError(f"expression must have 1..{_MAX_QUESTION_CHARS} characters")
    tree = expr()
    if pos != len(text):
        raise ValueError(f"unexpected {text[pos]!r} at {pos} in {text!r}")
    return tree


def expression_of(question: str) -> str:
    """"Compute (37+5)*4-12." -> "(37+5)*4-12"; raises ValueError if not a toy question."""
    if not (question.startswith(QUESTION_PREFIX) and question.endswith(QUESTION_SUFFIX)):
        raise ValueError(f"not a toy question: {question!r}")
    return question[len(QUESTION_PREFIX) : -len(QUESTION_SUFFIX)]


# --------------------------------------------------------------------------- worked solutions


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _has_carry(x: int, y: int) -> bool:
    """Column addition of non-negative x + y carries at least once."""
    dx, dy = _digits(x), _digits(y)
    carry = 0
    for i in range(max(len(dx), len(dy))):
        s = (dx[i] if i < len(dx) else 0) + (dy[i] if i < len(dy) else 0) + carry
        carry = 1 if s >= 10 else 0
        if carry:
            return True
    return False


def _has_borrow(big: int, small: int) -> bool:
    """Column subtraction big - small (0 ≤ small ≤ big) borrows at least once."""
    db, ds = _digits(big), _digits(small)
    borrow = 0
    for i in range(len(db)):
        d = db[i] - (ds[i] if i < len(ds) else 0) - borrow
        borrow = 1 if d < 0 else 0
        if borrow:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of a worked solution: a <op> b = result, with its notion tags."""

    op: str
    a: int
    b: int
    result: int
    tags: tuple[str, ...]

    def text(self) -> str:
        rhs = f"({self.b})" if self.b < 0 else str(self.b)
        line = f"{VERBS[self.op]} {self.a}{self.op}{rhs}={self.result}"
        return line + "".join(" " + t for t in self.tags)


def _step(op: str, a: int, b: int) -> Step:
    result = _apply(op, a, b)
    tags: list[str] = []
    if op in "+-":
        # The column algorithm a person (or model) runs depends on the signs: same signs add
        # magnitudes, different signs subtract the smaller magnitude from the larger.
        x, y = a, (b if op == "+" else -b)
        if (x >= 0) == (y >= 0) or x == 0 or y == 0:
            if _has_carry(abs(x), abs(y)):
                tags.append("carry")
        elif _has_borrow(max(abs(x), abs(y)), min(abs(x), abs(y))):
            tags.append("borrow")
    if result < 0:
        tags.append("negative")
    return Step(op, a, b, result, tuple(tags))


def _steps(root: Expr) -> tuple[tuple[Step, ...], int]:
    """Evaluation steps in the worked-solution order and the final value."""
    steps: list[Step] = []
    values: dict[int, int] = {}  # id(node) -> value, for nodes already evaluated

    def outer_groups(node: Expr, is_root: bool) -> list[BinOp]:
        # Outermost parenthesised BinOps strictly inside `node`, left to right.
        if isinstance(node, Num):
            return []
        if node.paren and not is_root:
            return [node]
        return outer_groups(node.left, False) + outer_groups(node.right, False)

    def post_order(node: Expr) -> int:
        if isinstance(node, Num):
            return node.value
        if id(node) in values:
            return values[id(node)]
        a, b = post_order(node.left), post_order(node.right)
        s = _step(node.op, a, b)
        steps.append(s)
        values[id(node)] = s.result
        return s.result

    def group(node: Expr) -> int:
        for inner in outer_groups(node, True):
            group(inner)
        return post_order(node)

    answer = group(root)
    return tuple(steps), answer


@dataclasses.dataclass(frozen=True)
class Worked:
    """A solved toy question: its steps, answer, notions (ordered as NOTIONS) and solution text."""

    steps: tuple[Step, ...]
    answer: int
    notions: tuple[str, ...]
    text: str


def _has_parens(e: Expr) -> bool:
    if isinstance(e, Num):
        return e.paren
    return e.paren or _has_parens(e.left) or _has_parens(e.right)


def solve(question: str) -> Worked:
    """Solves a toy question ("Compute 3+4.") and writes its worked solution.

    Raises ValueError if `question` is not a toy question.
    """
    tree = parse_expression(expression_of(question))
    steps, answer = _steps(tree)
    used = {VERBS[s.op] for s in steps} | {t for s in steps for t in s.tags}
    parens = _has_parens(tree)
    if parens:
        used.add("parentheses")
    notions = tuple(n for n in NOTIONS if n in used)
    lines = ([PARENTHESES_LINE] if parens else []) + [s.text() for s in steps] + [f"\\boxed{{{answer}}}"]
    return Worked(steps, answer, notions, "\n".join(lines))


def notions_of(problem: Problem | str) -> tuple[str, ...]:
    """The true notions a toy problem's worked solution uses, in NOTIONS order.

    Accepts a Problem or its question text; raises ValueError for a non-toy question.
    """
    question = problem.question if isinstance(problem, Problem) else problem
    return solve(question).notions


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
            with_it = _strip_parens(parse_expression(_render(nums, ops, spans + [span])))
            without = _strip_parens(parse_expression(_render(nums, ops, spans)))
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


def generate_question(level: int, rng: random.Random) -> str:
    """Draws one question of difficulty `level` (1..5) from `rng`; deterministic given its state.

    Rejection-samples until the level's limits hold (max |value|, multiplication cap).
    """
    spec = LEVELS[level]
    for _ in range(1000):
        n = rng.randint(*spec.n_operands)
        nums = [_number(rng, spec.digits) for _ in range(n)]
        ops = [rng.choice(spec.ops) for _ in range(n - 1)]
        spans = _draw_spans(rng, nums, ops, spec)
        question = QUESTION_PREFIX + _render(nums, ops, spans) + QUESTION_SUFFIX
        steps, _ = _steps(parse_expression(expression_of(question)))
        if _within_limits(steps, spec):
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

    Drawn from its own random namespace, so it never shifts with the training stream. Levels 1-2
    have small problem spaces (81 level-1 questions), so they repeat within the set only once
    those are exhausted and overlap the training stream by design; from level 3 on overlap is
    negligible. uid "toy-heldout-<seed>:<i>", source "toy:heldout".
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
