"""Toy arithmetic questions: parsing and the worked step-by-step solution.

`solve("Compute (37+5)*4-12.")` parses the expression (usual precedence, left associative,
parentheses) and writes the solution in the toy format, one step per line:

    parentheses first             (only when the question has parentheses)
    add 37+5=42 carry             <verb> <a><op><b>=<result>[ carry| borrow][ negative]
    multiply 42*4=168
    subtract 168-12=156
    \\boxed{156}

Order: parenthesised groups first (innermost first, left to right), then the rest in precedence
order (post-order of the parse tree). A negative right operand is written "(-7)". Tags: "carry"
when the step is, in magnitude, a column addition that carries; "borrow" when it is a column
subtraction that borrows (so "add -5+12=7 borrow": 12-5 borrows); "negative" when the result is
below zero. Multiplication is one memorised operation here and gets no carry tag.

Notions (`NOTIONS`): the verbs and tags used, plus "parentheses". None of these words occurs in a
question, so the meta reward never excludes a true notion as "already named in the problem".
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

from masa_jax.data.problem import Problem

NOTIONS: tuple[str, ...] = ("parentheses", "add", "subtract", "multiply", "carry", "borrow", "negative")
VERBS: Mapping[str, str] = {"+": "add", "-": "subtract", "*": "multiply"}
QUESTION_PREFIX = "Compute "
QUESTION_SUFFIX = "."
PARENTHESES_LINE = "parentheses first"
_MAX_PAREN_DEPTH = 16
_MAX_QUESTION_CHARS = 200

# --------------------------------------------------------------------------- expressions


@dataclasses.dataclass(frozen=True)
class Num:
    """An integer literal of the question."""

    value: int
    paren: bool = False


@dataclasses.dataclass(frozen=True)
class BinOp:
    """left <op> right, op in "+-*"."""

    op: str
    left: "Expr"
    right: "Expr"
    paren: bool = False  # written inside parentheses in the question


Expr = Union[Num, BinOp]


def strip_parens(e: Expr) -> Expr:
    """The same tree without the parenthesis marks (to test whether parentheses change the parse)."""
    if isinstance(e, Num):
        return Num(e.value)
    return BinOp(e.op, strip_parens(e.left), strip_parens(e.right))


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


def steps_of(root: Expr) -> tuple[tuple[Step, ...], int]:
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
    steps, answer = steps_of(tree)
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
