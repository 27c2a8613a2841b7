"""The out-of-domain suite on the math protocol's sampling: n samples per problem at its temperature / top-p /
max new tokens through the same `generate`, graded per benchmark (`graders`, MBPP in `sandbox`), pass@1 and
unbiased pass@k (`paper.score`). Results: a row per benchmark, an unweighted average per domain
("average/science", ...) and over all benchmarks ("average"), as JSON and Markdown."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from masa_jax import errors
from masa_jax import metrics as metrics_lib
from masa_jax.evaluation import paper
from masa_jax.evaluation.ood import benchmarks as bench_lib
from masa_jax.evaluation.ood import graders, sandbox
from masa_jax.rl.rollout_engine import GenerateFn

DOMAIN_AVERAGE = "average/{}"


def load_all(entries: Sequence[str], limit: int = 0, localize: Callable[[str], str] | None = None
             ) -> dict[str, bench_lib.Benchmark]:
    """The benchmarks of the --data entries (`benchmarks.benchmark_for`), each cut to its first `limit`
    problems (0: all). Every entry is read before anything runs, so a bad file stops the run at once.
    `localize(path)`: a local copy of a remote (gs://) file."""
    from masa_jax import fs
    if not entries:
        raise errors.UserError("--data: name the benchmark files (NAME=PATH or a path naming the benchmark; "
                               f"benchmarks: {', '.join(bench_lib.SPECS)}), comma-separated")
    out: dict[str, bench_lib.Benchmark] = {}
    for entry in entries:
        if not entry:
            raise errors.UserError("--data has an empty entry")
        name, path = bench_lib.benchmark_for(entry)
        if fs.is_remote(path):
            if bench_lib.SPECS[name].kind == "logic" or localize is None:
                raise errors.UserError(f"--data {entry}: copy it to a local path first (a logic set reads its "
                                       "few-shot file from next to its folder)")
            path = localize(path)
        if name in out:
            raise errors.UserError(f"--data names {name} twice")
        b = bench_lib.load(name, path)
        out[name] = dataclasses.replace(b, items=b.items[:limit or None])
    return out


def grade(benchmark: bench_lib.Benchmark, texts: Sequence[str], n: int, *,
          limits: sandbox.SandboxLimits = sandbox.SandboxLimits(), workers: int = 2) -> np.ndarray:
    """correct bool [P, n] of the responses `texts` (problem-major, n per problem)."""
    items = [it for it in benchmark.items for _ in range(n)]
    if benchmark.kind == "code":
        runs = sandbox.run_programs([graders.mbpp_program(t, it.tests, it.setup) for t, it in zip(texts, items)],
                                    limits, workers)
        ok = [r.passed for r in runs]
    elif benchmark.kind == "number":
        ok = [graders.grade_number(t, float(it.answer), it.unit) for t, it in zip(texts, items)]
    else:
        phrase = graders.LOGIC_ANSWER_PHRASE if benchmark.kind == "logic" else None
        ok = [graders.grade_choice(t, it.answer, it.labels, phrase) for t, it in zip(texts, items)]
    return np.asarray(ok, bool).reshape(len(benchmark.items), n)


def run(benchmarks: Mapping[str, bench_lib.Benchmark], generate: GenerateFn, codec, settings: paper.EvalSettings, *,
        rng_fn: Callable[[int, str], Any], limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
        workers: int = 2) -> dict:
    """Samples settings.n responses per problem (the user message alone, through the chat template), grades
    and scores them. Returns {benchmark: numbers (with its "domain"), "average/<domain>": ..., "average": ...,
    "settings": ...}."""
    results: dict = {}
    for i, (name, b) in enumerate(benchmarks.items()):
        prompt_ids = [codec.encode_chat([{"role": "user", "content": it.prompt}]) for it in b.items]
        out = generate([ids for ids in prompt_ids for _ in range(settings.n)], None, settings.max_new_tokens,
                       rng_fn(i, "solution"))
        texts = [codec.decode(t[:-1] if r == "eos" and t else t) for t, r in zip(out.tokens, out.finish_reasons)]
        correct = grade(b, texts, settings.n, limits=limits, workers=workers)
        lengths = np.array([len(t) for t in out.tokens], np.int64).reshape(len(b.items), settings.n)
        results[name] = dict(paper.score(correct, lengths, settings.ks, settings.max_new_tokens), domain=b.domain)
    rows = {k: v for k, v in results.items()}
    for domain in bench_lib.DOMAINS:
        members = {k: _numbers(v) for k, v in rows.items() if v["domain"] == domain}
        if members:
            results[DOMAIN_AVERAGE.format(domain)] = paper.average(members)
    results[paper.AVERAGE] = paper.average({k: _numbers(v) for k, v in rows.items()})
    results[paper.SETTINGS] = dict(dataclasses.asdict(settings), sandbox=dataclasses.asdict(limits))
    return results


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "domain"}


def _keys(results: Mapping[str, dict]) -> list[str]:
    return sorted({k for name, r in results.items() if name != paper.SETTINGS for k in r if k.startswith("pass@")},
                  key=lambda k: int(k.split("@")[1]))


def _ordered(results: Mapping[str, dict]) -> list[tuple[str, dict]]:
    """Benchmarks grouped by domain, each group followed by its average; the overall average last."""
    rows = []
    for domain in bench_lib.DOMAINS:
        rows += [(k, v) for k, v in results.items() if isinstance(v, dict) and v.get("domain") == domain]
        if DOMAIN_AVERAGE.format(domain) in results:
            rows.append((DOMAIN_AVERAGE.format(domain), results[DOMAIN_AVERAGE.format(domain)]))
    return rows + [(paper.AVERAGE, results[paper.AVERAGE])]


def format_table(results: Mapping[str, dict]) -> str:
    keys = _keys(results)
    head = f"{'benchmark':<24}{'problems':>9}" + "".join(f"{k:>10}" for k in keys) + f"{'length':>10}"
    lines = [head, "-" * len(head)]
    for name, r in _ordered(results):
        lines.append(f"{name:<24}{r['problems']:>9}" + "".join(
            f"{100 * r[k]:>9.2f}%" if k in r else f"{'':>10}" for k in keys)
            + f"{r.get('mean_length', math.nan):>10.1f}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def format_markdown(results: Mapping[str, dict], title: str = "") -> str:
    s = paper.EvalSettings(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in results[paper.SETTINGS].items() if k != "sandbox"})
    sb = results[paper.SETTINGS]["sandbox"]
    keys = _keys(results)
    lines = [f"# {title or 'Out-of-domain evaluation'}", "",
             f"Protocol: {s.describe().split(', prompt:')[0]}; each benchmark's own prompt (the authors' "
             "eval/utils.py). pass@1 = mean accuracy over the samples; pass@k = unbiased estimator "
             "1 - C(n-c, k) / C(n, k), averaged over problems; a domain's average and the **average** are "
             "unweighted means over benchmarks. MBPP programs ran sandboxed (wall "
             f"{sb['wall_s']:g} s, CPU {sb['cpu_s']} s, memory {sb['memory_bytes'] >> 20} MiB). Numbers in %.", "",
             "| benchmark | domain | problems | " + " | ".join(keys) + " | mean length | at token limit |",
             "|---|---|---:|" + "---:|" * len(keys) + "---:|---:|"]
    for name, r in _ordered(results):
        avg = name == paper.AVERAGE or name.startswith("average/")
        label = f"**{name}**" if avg else name
        domain = name.split("/", 1)[1] if name.startswith("average/") else ("all" if avg else r["domain"])
        length = r.get("mean_length")
        lines.append(f"| {label} | {domain} | {r['problems']} | " + " | ".join(_pct(r.get(k)) for k in keys)
                     + f" | {'-' if length is None else f'{length:.1f}'} | {_pct(r.get('at_token_limit'))} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_json: str, title: str = "") -> dict:
    """The JSON (`out_json`) and the Markdown next to it (same stem, .md). Returns {kind: path}."""
    stem = out_json[:-len(".json")] if out_json.endswith(".json") else out_json
    paths = {"json": out_json, "markdown": stem + ".md"}
    with open(out_json, "w") as f:
        json.dump(metrics_lib.to_json_value(results), f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(format_markdown(results, title))
    return paths
