"""XLA's per-device memory of every shipped config on its TPU slice, compiled on this (CPU) host.

    pip install -e ".[tpu]"          # libtpu's compile-only client; no TPU needed
    python experiments/compile_check.py                                   # every shipped config
    python experiments/compile_check.py --configs=qwen3_0p6b_colab --set rl.micro_batch_size=8
    python experiments/compile_check.py --configs=qwen8b --programs=train_step,decode --json=out.json

Prints `masa_jax.compile_check`'s table per config (the same as `--dry_run`), then one markdown line per
program for docs/benchmarks.md, with the versions, the date and the compile wall times.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from masa_jax import compile_check, config as config_lib  # noqa: E402
from masa_jax import dry_run  # noqa: E402

SHIPPED = ("qwen3_0p6b_colab", "qwen1p7b", "qwen8b", "qwen14b")
GiB = 1024 ** 3


def load(name: str, overrides: dict):
    spec = importlib.util.spec_from_file_location(f"{name}_cfg", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(config_lib.override(module.get_config(), overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(SHIPPED), help="config names under configs/, comma-separated")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override (a Python literal), e.g. rl.micro_batch_size=8; repeatable")
    ap.add_argument("--programs", default="", help="only these programs (comma-separated); default all")
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    args = ap.parse_args()
    missing = compile_check.libtpu_missing()
    if missing:
        sys.exit(f"error: {missing}")
    overrides = {}
    for item in args.set:
        field, value = item.split("=", 1)
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value
    programs = tuple(p for p in args.programs.split(",") if p) or None
    versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    print(f"# {when}, {versions}, python {platform.python_version()}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})")
    records, rows = [], []
    for name in args.configs.split(","):
        config = load(name, overrides)
        t0 = time.perf_counter()
        result = compile_check.check(config, programs=programs,
                                     on_program=lambda p: print(f"  compiled {p.name} ({p.seconds:.0f} s)",
                                                                file=sys.stderr, flush=True))
        print(f"\n## {name} {overrides or ''} ({time.perf_counter() - t0:.0f} s)")
        print("\n".join(compile_check.format_result(result)))
        est = dry_run.estimate(config, result.slice.chips)
        print(f"formula (rough): train_total {est['train_total'] / GiB:.2f}, rollout_total "
              f"{est['rollout_total'] / GiB:.2f} GiB")
        for p in result.programs:
            rec = dict(config=name, overrides=overrides, slice=result.slice.name, program=p.name, shapes=p.shapes,
                       seconds=round(p.seconds, 1), error=p.error, resident=p.resident, argument=p.argument,
                       output=p.output, alias=p.alias, temp=p.temp, code=p.code, peak=p.peak,
                       device=p.device_peak if not p.error else None, date=when, **versions)
            records.append(rec)
            if p.error:
                rows.append(f"| {name} | {result.slice.name} | {p.name} ({p.shapes}) | {p.error} | | "
                            f"{p.seconds:.0f} |")
            else:
                g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
                rows.append(f"| {name} | {result.slice.name} | {p.name} ({p.shapes}) | {g(p.argument)} / "
                            f"{g(p.output)} / {g(p.alias)} / {g(p.temp)} / {g(p.peak)} | {g(p.resident)} | "
                            f"**{g(p.device_peak)}** | {p.seconds:.0f} |")
        rows.append(f"| {name} | {result.slice.name} | verdict | {'fits' if result.fits else 'does not fit'} | | | |")
    print("\n| config | slice | program (shapes) | XLA args / out / alias / temp / peak GiB | resident | device | "
          "compile s |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
