"""Tests for masa_jax.toy.world: determinism, answers (by an independent ast evaluator), worked
solutions, notions and difficulty."""

import ast
import itertools
import re
import statistics

import pytest

from masa_jax.data.problem import Problem
from masa_jax.toy import world

N_PER_LEVEL = 600  # 3000 problems in all: ~0.5 s to generate


@pytest.fixture(scope="module")
def by_level():
    return {lvl: [world.problem_at(i, seed=0, difficulty_mix=lvl) for i in range(N_PER_LEVEL)] for lvl in world.LEVELS}


@pytest.fixture(scope="module")
def all_problems(by_level):
    return [p for ps in by_level.values() for p in ps]


# --------------------------------------------------------------------------- independent reference

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _expr(question):
    m = re.fullmatch(r"Compute ([0-9+\-*()]+)\.", question)
    assert m, question
    return m.group(1)


def _walk(node, steps):
    """Evaluates an ast node of + - * on int literals, recording (op, a, b, result) per BinOp."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    assert isinstance(node, ast.BinOp) and type(node.op) in _OPS, ast.dump(node)
    a, b = _walk(node.left, steps), _walk(node.right, steps)
    op = _OPS[type(node.op)]
    r = a + b if op == "+" else a - b if op == "-" else a * b
    steps.append((op, a, b, r))
    return r


def reference(question):
    steps = []
    value = _walk(ast.parse(_expr(question), mode="eval").body, steps)
    return value, steps


def ref_carry(x, y):
    # Column addition of x + y carries somewhere iff the low k digits overflow for some k.
    return any((x % 10**k) + (y % 10**k) >= 10**k for k in range(1, len(str(max(x, y))) + 1))


def ref_borrow(big, small):
    return any((big % 10**k) < (small % 10**k) for k in range(1, len(str(big)) + 1))


STEP_RE = re.compile(
    r"(?P<verb>add|subtract|multiply) (?P<a>-?\d+)(?P<op>[+\-*])(?P<b>-?\d+|\(-\d+\))=(?P<r>-?\d+)"
    r"(?P<tags>( carry| borrow)?( negative)?)"
)


def parse_solution(text):
    lines = text.split("\n")
    has_paren_line = lines[0] == "parentheses first"
    body = lines[1:-1] if has_paren_line else lines[:-1]
    steps = []
    for line in body:
        m = STEP_RE.fullmatch(line)
        assert m, f"bad step line {line!r} in {text!r}"
        b = int(m["b"].strip("()"))
        steps.append((m["verb"], m["op"], int(m["a"]), b, int(m["r"]), tuple(m["tags"].split())))
    return has_paren_line, steps, lines[-1]


# --------------------------------------------------------------------------- tests


def test_problem_records(all_problems):
    p = all_problems[0]
    assert isinstance(p, Problem)
    assert p.uid == "toy-0:0" and p.source == "toy:stream" and p.row == 0 and p.difficulty == 1
    assert len({q.uid for q in all_problems[:N_PER_LEVEL]}) == N_PER_LEVEL


def test_deterministic_given_seed():
    a = [world.problem_at(i, seed=3) for i in range(200)]
    b = list(itertools.islice(world.stream(seed=3), 200))
    c = list(itertools.islice(world.stream(seed=4), 200))
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    src = world.source(seed=3)
    assert src[150] == a[150] and len(src) > 10**15
    assert world.heldout(50, seed=9) == world.heldout(50, seed=9)
    assert world.heldout(50, seed=9) != world.heldout(50, seed=10)


def test_answers_match_independent_evaluator(all_problems):
    for p in all_problems:
        value, _ = reference(p.question)
        assert p.answer == str(value), p.question


def test_worked_solution_steps_are_correct_and_end_in_boxed_answer(all_problems):
    for p in all_problems:
        value, ref_steps = reference(p.question)
        has_paren_line, steps, last = parse_solution(p.solution)
        assert last == f"\\boxed{{{p.answer}}}" and p.solution.endswith(f"\\boxed{{{value}}}")
        assert has_paren_line == ("(" in p.question)
        # The same operations as the parse tree, each computed correctly, in a valid data flow.
        assert sorted(s[1:5] for s in steps) == sorted(ref_steps)
        available = [int(n) for n in re.findall(r"\d+", _expr(p.question))]
        for verb, op, a, b, r, tags in steps:
            assert verb == world.VERBS[op]
            assert a in available and b in available, (p.question, p.solution)
            available.remove(a)
            available.remove(b)
            available.append(r)
            x, y = a, (b if op == "+" else -b)
            expected = []
            if op != "*":
                if (x >= 0) == (y >= 0) or 0 in (x, y):
                    expected += ["carry"] if ref_carry(abs(x), abs(y)) else []
                else:
                    big, small = max(abs(x), abs(y)), min(abs(x), abs(y))
                    expected += ["borrow"] if ref_borrow(big, small) else []
            expected += ["negative"] if r < 0 else []
            assert list(tags) == expected, (p.question, p.solution)
        assert available == [value]


def test_parentheses_are_evaluated_first():
    p = world.make_problem("Compute 2*3+(4+5*(6-1)).", uid="u", source="s", row=0, difficulty=5)
    assert p.solution == (
        "parentheses first\n"
        "subtract 6-1=5\n"
        "multiply 5*5=25\n"
        "add 4+25=29\n"
        "multiply 2*3=6\n"
        "add 6+29=35 carry\n"
        "\\boxed{35}"
    )
    assert p.answer == "35"
    assert world.notions_of(p) == ("parentheses", "add", "subtract", "multiply", "carry")


def test_worked_examples_of_each_notion():
    assert world.solve("Compute 3+4.").text == "add 3+4=7\n\\boxed{7}"
    assert world.solve("Compute 3+4.").notions == ("add",)
    assert world.solve("Compute 52-17.").text == "subtract 52-17=35 borrow\n\\boxed{35}"
    assert world.solve("Compute 5-38.").text == "subtract 5-38=-33 negative\n\\boxed{-33}"  # 38-5
    assert world.solve("Compute 5-42.").text == "subtract 5-42=-37 borrow negative\n\\boxed{-37}"  # 42-5
    assert world.solve("Compute 7-(2-9).").text == (
        "parentheses first\nsubtract 2-9=-7 negative\nsubtract 7-(-7)=14 carry\n\\boxed{14}"
    )
    assert world.solve("Compute 3*(18-45).").notions == ("parentheses", "subtract", "multiply", "borrow", "negative")
    assert world.solve("Compute 41+58.").notions == ("add",)  # 1+8, 4+5: no carry


def test_notions_are_named_in_the_solution_and_nowhere_else(all_problems):
    counts = dict.fromkeys(world.NOTIONS, 0)
    for p in all_problems:
        notions = world.notions_of(p)
        assert notions == world.notions_of(p.question)
        words = set(re.findall(r"[a-z]+", p.solution))
        assert set(notions) == words & set(world.NOTIONS)
        expr = _expr(p.question)
        assert ("add" in notions) == ("+" in expr)
        assert ("subtract" in notions) == ("-" in expr)
        assert ("multiply" in notions) == ("*" in expr)
        assert ("parentheses" in notions) == ("(" in expr)
        # No notion is named by the question, so the meta reward never excludes a true one.
        assert not any(n in p.question.lower() for n in world.NOTIONS)
        for n in notions:
            counts[n] += 1
    # Every notion actually occurs in the generated data, often enough to be learnable.
    assert all(c >= 100 for c in counts.values()), counts


def test_difficulty_controls_size(by_level):
    stats = {}
    for lvl, ps in by_level.items():
        spec = world.LEVELS[lvl]
        for p in ps:
            assert p.difficulty == lvl
            nums = re.findall(r"\d+", p.question)
            assert spec.n_operands[0] <= len(nums) <= spec.n_operands[1]
            assert all(spec.digits[0] <= len(n) <= spec.digits[1] for n in nums)
            assert set(re.findall(r"[+\-*]", p.question)) <= set(spec.ops)
            assert p.question.count("(") <= spec.max_parens
            assert len(p.question) <= 40
            assert abs(int(p.answer)) <= spec.max_abs
            assert len(p.solution) <= 200, p.solution
        stats[lvl] = (
            statistics.mean(len(p.solution) for p in ps),
            statistics.mean(len(re.findall(r"\d+", p.question)) for p in ps),
            statistics.mean("(" in p.question for p in ps),
        )
    sol_len = [stats[lvl][0] for lvl in sorted(stats)]
    operands = [stats[lvl][1] for lvl in sorted(stats)]
    assert sol_len == sorted(sol_len) and sol_len[0] < 30 and 40 < sol_len[3] < 120 and sol_len[4] < 200
    assert operands == sorted(operands) and operands[:3] == [2, 2, 2] and operands[4] == 4
    assert stats[1][2] == stats[2][2] == stats[3][2] == 0 and stats[5][2] > 0.4
    # Level 1 is trivial: two one-digit numbers added; level 2 one-digit subtraction or multiplication
    # (both occur); level 3 always has a two-digit operand.
    assert all(re.fullmatch(r"Compute [1-9]\+[1-9]\.", p.question) for p in by_level[1])
    assert all(re.fullmatch(r"Compute [1-9][-*][1-9]\.", p.question) for p in by_level[2])
    assert {p.question[9] for p in by_level[2]} == {"-", "*"}
    assert all(re.search(r"\d\d", p.question) for p in by_level[3])


def test_difficulty_mix():
    ps = [world.problem_at(i, seed=1, difficulty_mix={1: 1.0, 5: 3.0}) for i in range(800)]
    levels = [p.difficulty for p in ps]
    assert set(levels) == {1, 5}
    assert 0.18 < levels.count(1) / len(levels) < 0.32
    uniform = [world.problem_at(i, seed=1).difficulty for i in range(500)]
    assert set(uniform) == set(world.LEVELS)
    assert {world.problem_at(i, 1, (0, 0, 1, 0, 0)).difficulty for i in range(50)} == {3}
    for bad in ({6: 1.0}, (1, 1), {1: -1.0}, {1: 0.0}):
        with pytest.raises(ValueError):
            world.problem_at(0, 1, bad)


def test_heldout_is_fixed_distinct_and_balanced():
    ev = world.heldout(400, seed=1234)
    assert len(ev) == 400 and len({p.question for p in ev}) == 400
    assert [p.difficulty for p in ev[:6]] == [1, 2, 3, 4, 5, 1]
    assert ev[3].uid == "toy-heldout-1234:3" and ev[3].source == "toy:heldout" and ev[3].row == 3
    for p in ev:
        assert p.answer == str(reference(p.question)[0])
    # Hard levels barely overlap the training stream (easy levels are small spaces by design).
    train = {world.problem_at(i, 0).question for i in range(3000)}
    level3 = [p for p in ev if p.difficulty == 3]
    hard = [p for p in ev if p.difficulty >= 4]
    assert sum(p.question in train for p in level3) <= 0.1 * len(level3)
    assert sum(p.question in train for p in hard) <= 0.02 * len(hard)


def test_rejects_non_toy_questions():
    for bad in ("What is 2+2?", "Compute 2+.", "Compute 2++3.", "Compute (2+3.", "Compute 2/3.", "Compute -2+3."):
        with pytest.raises(ValueError):
            world.notions_of(bad)
    with pytest.raises(ValueError):
        world.solve("Compute " + "(" * 40 + "1" + ")" * 40 + ".")


def test_config_specs():
    assert world.training_problems("toy:30", seed=4) == [world.problem_at(i, seed=4) for i in range(30)]
    levels = {p.difficulty for p in world.load_spec("toy:40:3")}
    assert levels == {3}
    weighted = world.load_spec("toy:200:1,0,0,0,1", seed=2)
    assert {p.difficulty for p in weighted} == {1, 5} and weighted[0] == world.problem_at(0, 2, (1, 0, 0, 0, 1))
    assert world.load_spec("toy-heldout:20") == list(world.heldout(20))
    assert world.load_spec("toy-heldout:20:7", seed=99) == list(world.heldout(20, seed=7))
    for bad in ("toy:", "toy:x", "toy:5:1,2", "toy:5:3:4", "toys:5", "toy-heldout:5:a"):
        with pytest.raises(ValueError):
            world.load_spec(bad)


def test_sources_dispatch_toy_specs():
    from masa_jax.data import sources

    loaded = sources.load_problems("toy-heldout:15")
    assert loaded.problems == world.heldout(15) and loaded.num_skipped == 0
    assert sources.load_problems("toy:5").problems == tuple(world.problem_at(i, 0) for i in range(5))
