"""The tiny default run's start with and without the persistent compilation cache (config.compile_cache).

Runs the README's first command (`python -m masa_jax.train --config=configs/tiny.py`) for one step in
fresh processes, each in a new workdir: cache off, cache cold (an empty cache dir), cache warm (the
same dir again), repeated `--repeats` times with a new cold dir each round. Prints, per case, the
median process wall time (start-up, the held-out evaluation before step 1, step 1, the closing
evaluation) and step 1's `time/step_s`, and the ratios off / warm.

    python experiments/bench_compile_cache.py [--repeats=2] [--steps=1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir: str, cache_dir: str | None, steps: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "masa_jax.train", "--config=configs/tiny.py", f"--config.total_steps={steps}",
           f"--workdir={workdir}"]
    cmd += ["--config.compile_cache.enabled=False"] if cache_dir is None else [f"--config.compile_cache.dir={cache_dir}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MASA_JAX_COMPILE_CACHE_DIR", None)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    return wall, first["time/step_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cache = os.path.join(tmp, f"cache{r}")
            for case in ("off", "cold", "warm"):
                wall, step = run(os.path.join(tmp, f"{case}{r}"), None if case == "off" else cache, args.steps)
                results[case].append((wall, step))
                print(f"round {r + 1} {case:>4}: process {wall:6.1f} s, step 1 {step:6.1f} s", flush=True)
    med = {c: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for c, v in results.items()}
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} CPUs")
    print("| case | process wall (median) | step 1 time/step_s (median) |")
    print("|---|---:|---:|")
    for c, (w, s) in med.items():
        print(f"| cache {c} | {w:.1f} s | {s:.1f} s |")
    print(f"| off / warm | {med['off'][0] / med['warm'][0]:.2f}x | {med['off'][1] / med['warm'][1]:.2f}x |")


if __name__ == "__main__":
    main()
