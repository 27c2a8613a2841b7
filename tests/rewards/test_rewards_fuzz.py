"""Fuzz / adversarial inputs through verify and parse: no exception, no hang past the budget,
nothing executed (a canary file is never created)."""
import json
import random
import string
import time

import pytest

from masa_jax.rewards import meta
from masa_jax.rewards.math import MathVerifier

BUDGET_S = 40.0


def _code(canary):
    c = str(canary)
    return [
        f"__import__('os').system('touch {c}')",
        f"open('{c}', 'w').write('x')",
        f"exec(\"open('{c}','w')\")",
        f"eval(\"__import__('os').system('touch {c}')\")",
        f"(lambda: __import__('pathlib').Path('{c}').touch())()",
        f"[c for c in ().__class__.__base__.__subclasses__()][0]",
        f"__import__('subprocess').run(['touch', '{c}'])",
        f"Symbol('x'); __import__('os').system('touch {c}')",
        f"sympify(\"__import__('os').system('touch {c}')\")",
    ]


HOSTILE_MATH = [
    "2^{2^{2^{2^{2^{2}}}}}", "9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "100000!", "(10^{100})!",
    "\\frac{1}{" * 40 + "2" + "}" * 40, "{" * 300 + "1" + "}" * 300, "(" * 500 + ")" * 500,
    "\\sqrt{" * 200 + "2" + "}" * 200, "x^{" * 100 + "2" + "}" * 100,
    "\\begin{pmatrix}" + "1&" * 300 + "1\\end{pmatrix}", "\\int_0^\\infty e^{-x^{x^{x}}} dx",
    "\\sum_{n=1}^{10^{100}} n^{n}", "1" * 990, "1/0", "0^0", "\\infty - \\infty", "\\text{" * 50,
    "\\left(" * 100, "\\\\" * 400, "$$$$", "%" * 100, "\\boxed{\\boxed{\\boxed{3}}}", "nan", "NaN",
    "\\def\\x{\\x}\\x", "\\input{/etc/passwd}", "\\write18{touch /tmp/x}",
]


def _random_strings(rng, n):
    alphabet = string.printable + "{}\\$^_" * 5 + "αβ∑√∞"
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 5, 20, 100, 400])
        out.append("".join(rng.choice(alphabet) for _ in range(k)))
    return out


def _responses(rng, canary):
    hostile = HOSTILE_MATH + _code(canary)
    responses = []
    responses += [f"so \\boxed{{{h}}}" for h in hostile]  # reach the workers
    responses += [f"text {h} \\boxed{{5}}" for h in hostile]  # quick path
    responses += [f"\\boxed{{{s}}}" for s in _random_strings(rng, 120)]
    responses += _random_strings(rng, 2500)  # mostly no box at all
    responses += _code(canary)  # code outside a box
    big = "".join(rng.choice("{}\\boxed 123") for _ in range(100_000))
    responses += [
        "a" * 100_000 + "\\boxed{1}",
        "\\boxed{" + "1" * 100_000 + "}",
        "\\boxed{" * 12_000,
        "{" * 100_000,
        "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
        "2^{" * 30_000 + "}" * 30_000,
        big,
        "\\boxed{" + "2^{" * 300 + "2" + "}" * 300 + "}",
    ]
    return responses


def test_fuzz_verify(tmp_path):
    canary = tmp_path / "canary"
    rng = random.Random(1234)
    responses = _responses(rng, canary)
    answers = [rng.choice(["5", "1", "\\frac{1}{2}", "x", "", "{A,D}"]) for _ in responses]
    assert len(responses) > 2500
    with MathVerifier(num_workers=2, per_item_timeout_s=3.0, mv_timeout_s=1,
                      batch_budget_s=BUDGET_S) as v:
        v.wait_ready(60)
        t0 = time.monotonic()
        ok, m = v.verify(responses, answers)
        elapsed = time.monotonic() - t0
        assert elapsed < BUDGET_S + 2.0
        assert ok.shape == (len(responses),) and ok.dtype == bool
        assert m["errors"] == 0  # sympy failures are caught inside math-verify; ours must not leak
        print(f"fuzz verify: {len(responses)} items in {elapsed:.1f}s, metrics {m}")
        # the pool still works afterwards, even if it had to kill workers
        ok2, _ = v.verify(["\\boxed{\\sqrt{4}}"], ["2"])
        assert ok2.tolist() == [True]
    assert not canary.exists()


def _hostile_json(rng):
    base = {"math_notion": ["a", "\\frac{1}{2}"], "pass_rate": 3, "solution_length": 700}
    out = []
    for value in ["NaN", "Infinity", "-Infinity", "1e999", "-0", "9" * 400, "1" + "0" * 5000, "true",
                  "null", "[]", "{}", '"8/0"', '"nan"', '"inf"', '"1e400"', '"0x10"', '"５"']:
        for key in ("pass_rate", "solution_length", "math_notion"):
            out.append("</meta>" + json.dumps({**base, key: "@V@"}).replace('"@V@"', value))
            out.append('</meta>{"%s": %s}' % (key, value))
    out += [
        "</meta>{" * 5000 + "}" * 5000,
        '{"pass_rate": ' * 20000 + "3" + "}" * 20000,
        '{"math_notion": [' + '"x",' * 20000 + '], "pass_rate": 1}',
        '{"math_notion": "' + "\\" * 50000 + '"}',
        "```json\n" * 1000 + '{"pass_rate": 2}',
        "{'pass_rate': __import__('os').system('touch CANARY')}",
        "{'pass_rate': (lambda: 1)()}",
        "{'pass_rate': 2**2**2**2**2**2}",
        "{'pass_rate': 9**9**9**9}",
        "{'pass_rate': " + "(" * 5000 + "1" + ")" * 5000 + "}",
        "{'math_notion': [" + "[" * 200 + "]" * 200 + "], 'pass_rate': 1}",
        "{'pass_rate': 1, **{'a': 1}}",
        "{'pass_rate': {1, 2}}",
        "{'pass_rate': b'8'}",
        "{'pass_rate': 1+2j}",
    ]
    for _ in range(3000):
        pieces = [rng.choice(['{', '}', '"', "'", ',', ':', '[', ']', '\\', 'pass_rate', 'math_notion',
                              'solution_length', '</meta>', '3', '0.5', 'NaN', ' ', '\n', 'frac', 'e9'])
                  for _ in range(rng.randint(1, 60))]
        out.append("".join(pieces))
    return out


@pytest.mark.timing
def test_fuzz_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "touch CANARY" above would land here
    rng = random.Random(99)
    texts = _hostile_json(rng) + _random_strings(rng, 1000) + _code(tmp_path / "canary")
    worst = 0.0
    for text in texts:
        t0 = time.perf_counter()
        out = meta.parse(text)
        worst = max(worst, time.perf_counter() - t0)
        assert isinstance(out, meta.MetaPrediction)
        assert out.pass_rate is None or 0.0 <= out.pass_rate <= 1.0
        assert out.length is None or 1 <= out.length <= 10**6
        assert out.notions is None or all(isinstance(n, str) for n in out.notions)
    assert worst < 1.0, worst
    assert not (tmp_path / "canary").exists() and not (tmp_path / "CANARY").exists()


@pytest.mark.timing
@pytest.mark.parametrize("n", [100_000])
def test_parse_is_fast_on_100k_hostile_texts(n):
    for text in ("{" * n, "}" * n, '{"pass_rate": 1}' * (n // 16), ('{"pass_rate": ' * n)[:n],
                 "\\" * n, "</meta>" * (n // 7), '{"math_notion": ["' + "a{" * (n // 2)):
        t0 = time.perf_counter()
        meta.parse(text)
        assert time.perf_counter() - t0 < 0.5
