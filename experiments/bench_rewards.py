"""Benchmark of the rewards: MATH verification accuracy / throughput and self_alignment speed.

    .venv/bin/python experiments/bench_rewards.py [--workers 2] [--data tests/data/math_test_solutions.jsonl.gz]

Prints
1. ``verify`` on the 5,000 MATH test reference solutions against their targets (fraction judged
   correct, items/s) and against a perturbed target (the next row's target that differs as a string;
   fraction judged incorrect, items/s), with every misjudged row (row, target, extracted answer);
2. plain math-verify in one process on a sample, for scale;
3. ``meta.self_alignment`` for P=128, M=16, G=16 with ~2k-token solutions, and ``meta.parse`` of the
   P*M meta outputs.
"""
import argparse
import gzip
import json
import pathlib
import random
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from masa_jax.rewards import meta  # noqa: E402
from masa_jax.rl import prompts  # noqa: E402
from masa_jax.rewards.math import MathVerifier, canonical_text, extract_answer  # noqa: E402


def load_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def perturbed(targets):
    """Row i gets the next row's target that differs from its own after canonical_text."""
    n, out = len(targets), []
    for i, t in enumerate(targets):
        j = (i + 1) % n
        while canonical_text(targets[j]) == canonical_text(t):
            j = (j + 1) % n
        out.append(targets[j])
    return out


def bench_verify(rows, workers):
    solutions = [r["solution"] for r in rows]
    targets = [r["target"] for r in rows]
    t0 = time.monotonic()
    with MathVerifier(num_workers=workers, batch_budget_s=600.0) as v:
        v.wait_ready(120)
        print(f"workers ready in {time.monotonic() - t0:.1f}s ({workers} workers)")
        for name, answers, want in (("reference", targets, True),
                                    ("perturbed", perturbed(targets), False)):
            cpu0 = time.process_time()
            ok, m = v.verify(solutions, answers)
            parent_cpu = time.process_time() - cpu0
            rate = len(rows) / m["seconds"]
            hit = float(np.mean(ok == want))
            print(f"\n[{name}] judged {'correct' if want else 'incorrect'}: {hit:.4%} "
                  f"({int(np.sum(ok == want))}/{len(rows)}); {m['seconds']:.2f}s = {rate:.0f} items/s")
            # Other jobs share the 2 cores: CPU seconds say what an idle machine would take.
            idle = parent_cpu + m["worker_cpu_s"] / workers
            print(f"  CPU: parent {parent_cpu:.1f}s, workers {m['worker_cpu_s']:.1f}s -> "
                  f"~{idle:.1f}s = {len(rows) / idle:.0f} items/s on an otherwise idle machine")
            print(f"  quick decisions in the parent: {m['quick_decisions']}, sent to workers: "
                  f"{m['parsed_checks']}, unfinished: {m['unfinished']}, hard timeouts: "
                  f"{m['hard_timeouts']}, soft timeouts: {m['soft_timeouts']}, errors: {m['errors']}")
            for i in np.flatnonzero(ok != want):
                print(f"  misjudged row {rows[i]['row']}: target {answers[i]!r}, "
                      f"extracted {extract_answer(solutions[i])!r}")


def bench_plain_math_verify(rows, n=200):
    from math_verify import parse, verify

    sample = rows[:n]
    parse("$1$"), verify(parse("$1$"), parse("$1$"))  # imports and first-use costs out of the timing
    t0 = time.perf_counter()
    ok = [verify(parse("$" + r["target"] + "$"), parse(r["solution"])) for r in sample]
    dt = time.perf_counter() - t0
    print(f"plain math_verify.parse/verify, one process, first {n} rows: {dt / n * 1e3:.1f} ms/item, "
          f"{np.mean(ok):.2%} judged correct")


def synthetic_alignment_batch(P=128, M=16, G=16, words_per_solution=1500, seed=0):
    """Problems, ~2k-token solutions (1,500 words ~ 8k characters), meta texts with 3-6 notions each."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    concepts = ["geometric series", "Vieta's formulas", "AM-GM inequality", "modular arithmetic",
                "Chinese remainder theorem", "Pythagorean theorem", "law of cosines", "binomial theorem",
                "inclusion-exclusion", "pigeonhole principle", "Fermat's little theorem", "complex numbers",
                "generating functions", "recurrence relations", "similar triangles", "power of a point",
                "Cauchy-Schwarz", "prime factorization", "Euler's totient", "linearity of expectation"]
    filler = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
              for _ in range(3000)] + ["the", "of", "and", "is", "we", "so", "$x$", "=", "+", "\\frac{1}{2}"]
    vocab = np.array(filler + [c.split()[-1] for c in concepts])
    problems, solutions, texts = [], [], []
    for _ in range(P):
        pool = rng.sample(concepts, 8)
        problems.append(f"Find the number of {pool[0]} solutions modulo 7 of the given equation.")
        row = []
        for _ in range(G):
            words = list(nprng.choice(vocab, size=words_per_solution))
            for c in rng.sample(pool, 3):
                words.insert(rng.randrange(len(words)), c)
            row.append(" ".join(words))
        solutions.append(row)
        texts.append([prompts.serialize_expert_meta("some reasoning " * 40, rng.sample(pool, rng.randint(3, 6)),
                                                    rng.randint(0, 8), rng.randint(128, 4096))
                      for _ in range(M)])
    correct = nprng.random((P, G)) < 0.5
    lengths = nprng.integers(200, 2048, size=(P, G))
    return problems, solutions, texts, correct, lengths


def bench_self_alignment():
    problems, solutions, texts, correct, lengths = synthetic_alignment_batch()
    P, M, G = len(texts), len(texts[0]), correct.shape[1]
    chars = statistics.mean(len(s) for row in solutions for s in row)
    t0 = time.perf_counter()
    preds = [[meta.parse(t) for t in row] for row in texts]
    t_parse = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = meta.self_alignment(preds, problems, solutions, correct, lengths)
        times.append(time.perf_counter() - t0)
    print(f"\nself_alignment P={P} M={M} G={G}, solutions ~{chars:.0f} chars (~2k tokens): "
          f"{min(times):.3f}s best / {statistics.median(times):.3f}s median of 3")
    print(f"meta.parse of {P * M} meta outputs: {t_parse:.3f}s; mean rewards "
          + ", ".join(f"{k} {float(v.mean()):.3f}" for k, v in r.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT / "tests" / "data" / "math_test_solutions.jsonl.gz"))
    ap.add_argument("--skip-plain", action="store_true", help="skip the plain math-verify sample")
    args = ap.parse_args()
    rows = load_rows(args.data)
    if not args.skip_plain:
        bench_plain_math_verify(rows)  # first: the machine's current speed, for scale
    bench_verify(rows, args.workers)
    bench_self_alignment()


if __name__ == "__main__":
    main()
