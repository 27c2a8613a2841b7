"""The paper's evaluation protocol for math (what ``python -m masa_jax.evaluate`` runs).

Defaults as the paper evaluates: 32 samples per problem at temperature 0.6 and top-p 1.0, at most
16k (16384) new tokens, the raw problem text as the prompt (the authors' eval/inference.py: no training
instruction; `prompt="solution"` uses the run's training solution prompt instead), never a notion hint; pass@1 = the mean accuracy over the samples
(avg@32), pass@k = the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over problems. Results: one
table, a row per benchmark plus their unweighted average (the paper's "Avg." column), as JSON and
Markdown; with ``--meta`` also the meta-awareness report (`meta_eval`).

Benchmark files are read in the layouts the paper's six benchmarks (AIME24, AIME25, AMC23, MATH500,
Minerva, OlympiadBench) commonly come in: verl parquet (`reward_model.ground_truth`), a flat parquet (as
HF datasets ship AIME) or JSONL with `problem` / `answer` or `question` / `answer` fields (`id`,
`solution`, `level` optional; a numeric answer such as AMC23's 27.0 is read as text). Anything else
stops with an error naming the file, the row and the missing field (OlympiadBench's original
`final_answer` list, for one, needs converting).

Settings come, field by field, from the command-line flag when given, else from the config's
`evaluate` section (`configs/eval_paper.py` adds one: `with_protocol`), else from `PAPER`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from masa_jax import errors
from masa_jax import metrics as metrics_lib
from masa_jax.data import sources

log = logging.getLogger(__name__)

# The paper's protocol. num_meta = 0: the training run's rollout.num_meta. top_p 1.0 as the authors'
# eval/inference.py (SamplingParams(top_p=1.0)) and docs/method.md.
# prompt: "raw" = the problem text alone as the user message, as the authors evaluate (eval/utils.py
# _simple_data_processing: {"role": "user", "content": item[problem]}; the paper's tables); "solution" = the
# run's training solution prompt (config.prompts.solution_template: the problem plus the boxed instruction).
PAPER: dict[str, Any] = dict(n=32, ks=(1, 8, 32), temperature=0.6, top_p=1.0, top_k=0, max_new_tokens=16384,
                             seed=0, limit=0, meta=False, num_meta=0, data=(), prompt="raw", suite="math")
PROMPTS = ("raw", "solution")
# suite: "math" = this module's benchmarks; "ood" = the ten out-of-domain benchmarks (`evaluation.ood`), each
# with its own prompt (`prompt` does not apply), on the same sampling.
SUITES = ("math", "ood")
RAW_TEMPLATE = "{question}"  # the solution prompt's template for prompt="raw"

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
AVERAGE = "average"
SETTINGS = "settings"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    n: int
    ks: tuple[int, ...]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    limit: int
    meta: bool
    num_meta: int
    data: tuple[str, ...]
    prompt: str = "raw"
    suite: str = "math"

    def describe(self) -> str:
        prompt = ("the raw problem text" if self.prompt == "raw" else "the training solution prompt")
        return (f"{self.n} samples per problem, temperature {self.temperature:g}, top-p {self.top_p:g}, "
                f"top-k {self.top_k or 'off'}, at most {self.max_new_tokens} new tokens, seed {self.seed}, "
                f"prompt: {prompt}")

    def solution_template(self, config) -> str:
        """The template `scoring.sample_and_score` formats each problem with."""
        return RAW_TEMPLATE if self.prompt == "raw" else config.prompts.solution_template


def with_protocol(config, **overrides):
    """`config` (a masa_jax ConfigDict) with an `evaluate` section holding the paper's protocol (`PAPER`,
    updated by `overrides`); --config.evaluate.<field>=... overrides it on the command line."""
    import ml_collections as mlc
    values = dict(PAPER, **overrides)
    unknown = set(overrides) - set(PAPER)
    if unknown:
        raise ValueError(f"unknown evaluation settings {sorted(unknown)}; known: {sorted(PAPER)}")
    values["ks"], values["data"] = tuple(values["ks"]), tuple(values["data"])
    with config.unlocked():
        config.evaluate = mlc.ConfigDict(values)
    return config


def resolve_settings(config, flags: Mapping[str, Any] | None = None) -> EvalSettings:
    """Field by field: flags[name] when not None, else config.evaluate.<name>, else PAPER. `ks` and `data`
    accept comma-separated strings; the number of meta samples falls back to config.rollout.num_meta."""
    flags = flags or {}
    section = config.get("evaluate") if hasattr(config, "get") else None
    values, given = {}, set()
    for name, default in PAPER.items():
        v = flags.get(name)
        if v is None and section is not None and name in section:
            v = section[name]
        values[name] = default if v is None else v
        if v is not None and v != default:
            given.add(name)
    ks = values["ks"]
    try:
        values["ks"] = tuple(int(k) for k in (ks.split(",") if isinstance(ks, str) else ks) if str(k).strip())
    except (TypeError, ValueError):
        raise errors.UserError(f"--k {ks!r}: pass@k values are comma-separated integers, e.g. --k=1,8,32") from None
    data = values["data"]
    values["data"] = tuple(d for d in (data.split(",") if isinstance(data, str) else data) if d)
    if not values["num_meta"]:
        values["num_meta"] = int(config.rollout.num_meta)
    s = EvalSettings(n=int(values["n"]), ks=values["ks"], temperature=float(values["temperature"]),
                     top_p=float(values["top_p"]), top_k=int(values["top_k"]),
                     max_new_tokens=int(values["max_new_tokens"]), seed=int(values["seed"]), limit=int(values["limit"]),
                     meta=bool(values["meta"]), num_meta=int(values["num_meta"]), data=values["data"],
                     prompt=str(values["prompt"]), suite=str(values["suite"]))
    if s.suite not in SUITES:
        raise errors.UserError(f"config.evaluate.suite must be one of {SUITES}, got {s.suite!r}")
    if s.prompt not in PROMPTS:
        raise errors.UserError(f"config.evaluate.prompt must be one of {PROMPTS} (raw: the problem text alone, as the "
                               f"authors evaluate; solution: the training prompt), got {s.prompt!r}")
    if s.n < 1 or s.max_new_tokens < 1 or s.num_meta < 1 or s.limit < 0:
        raise errors.UserError(f"evaluation needs n >= 1, max_new_tokens >= 1, num_meta >= 1 and limit >= 0, got "
                               f"n={s.n}, max_new_tokens={s.max_new_tokens}, num_meta={s.num_meta}, limit={s.limit}")
    if not s.temperature >= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise errors.UserError(f"evaluation needs temperature >= 0, top_p in (0, 1] and top_k >= 0, got "
                               f"{s.temperature}, {s.top_p}, {s.top_k}")
    if any(k < 1 for k in s.ks):
        raise errors.UserError(f"--k: pass@k needs k >= 1, got {s.ks}")
    too_large = [k for k in s.ks if k > s.n]
    if too_large and "ks" in given:
        raise errors.UserError(f"--k {','.join(map(str, s.ks))}: pass@{too_large[0]} needs at least "
                               f"{too_large[0]} samples per problem, --n is {s.n}; raise --n or drop it from --k")
    if too_large:  # the paper's default k values, with a smaller n: report what n allows, and say so
        log.warning("pass@%s not reported: n=%d samples per problem", ",".join(map(str, too_large)), s.n)
        s = dataclasses.replace(s, ks=tuple(k for k in s.ks if k <= s.n))
    return s


# ----------------------------------------------------------------------------------------- benchmarks


def _row_fields(path: str, row: int) -> list[str]:
    """The field names of row `row` (a JSONL line index; a parquet's columns)."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            return list(pq.read_schema(path).names)
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if i == row:
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else []
    except Exception:  # only used to word an error message
        return []
    return []


def _field_error(path: str, e: sources.DataError) -> errors.UserError:
    fields = _row_fields(path, e.row)
    found = f" (its fields: {', '.join(fields)})" if fields else ""
    if e.field in sources.QUESTION_KEYS and e.reason == "missing":
        return errors.UserError(f"{path} row {e.row}: no problem text: a benchmark row needs a `problem` or "
                                f"`question` field and an `answer`{found}")
    if e.field in sources.ANSWER_KEYS and e.reason == "missing":
        return errors.UserError(f"{path} row {e.row}: no `answer` field: a benchmark row needs a `problem` or "
                                f"`question` field and an `answer`{found}")
    return errors.UserError(f"{e}: fix the row")


def _load_flat_parquet(path: str) -> sources.Loaded:
    """A parquet of flat rows (as HF datasets distribute AIME / MATH-500): problem|question, answer, ..."""
    import pyarrow.parquet as pq
    records = pq.read_table(path).to_pylist()
    stem = os.path.basename(path)[: -len(".parquet")]
    problems = tuple(sources.dict_to_problem(r, source=path, row=i, uid_prefix=stem) for i, r in enumerate(records))
    return sources.Loaded(problems)


def load_benchmark(path: str) -> list[sources.Problem]:
    """The problems of one benchmark file (module doc: the formats); errors are `UserError`s naming the file,
    the row and the field."""
    if not path:
        raise errors.UserError("--data has an empty entry: name the benchmark files (parquet or JSONL)")
    if not os.path.isfile(path):
        raise errors.UserError(f"benchmark file {path} does not exist: fix --data")
    if not path.endswith((".parquet", ".jsonl")):
        raise errors.UserError(f"benchmark file {path}: expected a .parquet (verl or flat) or .jsonl file")
    try:
        try:
            loaded = sources.load_problems(path, on_error="raise")
        except sources.DataError as e:
            if path.endswith(".parquet") and e.field == "reward_model" and e.reason == "missing column":
                loaded = _load_flat_parquet(path)
            else:
                raise
    except sources.DataError as e:
        raise _field_error(path, e) from e
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise errors.UserError(f"benchmark file {path} cannot be read ({errors.one_line(e)})") from e
    if not loaded.problems:
        raise errors.UserError(f"benchmark file {path} holds no problems")
    return list(loaded.problems)


def benchmark_name(path: str) -> str:
    return os.path.basename(path)


# ----------------------------------------------------------------------------------------- scoring


def score(correct: np.ndarray, lengths: np.ndarray, ks: Sequence[int], max_new_tokens: int | None = None) -> dict:
    """One benchmark's numbers from correct bool [P, n] and response lengths [P, n]: problems, n, pass@1 (mean
    accuracy), pass@k for 1 < k <= n (unbiased, mean over problems), mean response length and the share of
    responses that reached max_new_tokens."""
    correct = np.asarray(correct, bool)
    P, n = correct.shape
    c = correct.sum(axis=1)
    out = {"problems": int(P), "n": int(n), "pass@1": float(correct.mean()) if P else math.nan,
           "mean_length": float(np.mean(lengths)) if P else math.nan}
    for k in ks:
        if 1 < k <= n:
            out[f"pass@{k}"] = float(np.mean(metrics_lib.pass_at_k(n, c, k))) if P else math.nan
    if max_new_tokens:
        out["at_token_limit"] = float(np.mean(np.asarray(lengths) >= max_new_tokens)) if P else math.nan
    return out


def average(results: Mapping[str, dict]) -> dict:
    """Unweighted mean over benchmarks of every numeric metric they all have (problems: the total)."""
    rows = [r for name, r in results.items() if name not in (AVERAGE, SETTINGS)]
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in ("problems", "n", "meta") and all(k in r for r in rows)]
    out = {"benchmarks": len(rows), "problems": int(sum(r["problems"] for r in rows))}
    out.update({k: float(np.mean([r[k] for r in rows])) for k in keys})
    return out


def _pass_keys(results: Mapping[str, dict]) -> list[str]:
    return sorted({k for name, r in results.items() if name != SETTINGS for k in r if k.startswith("pass@")},
                  key=lambda k: int(k.split("@")[1]))


def _rows(results: Mapping[str, dict]):
    return [(name, r) for name, r in results.items() if name != SETTINGS]


def format_table(results: Mapping[str, dict]) -> str:
    """The console table: a row per benchmark and the average."""
    keys = _pass_keys(results)
    head = f"{'benchmark':<28}{'problems':>9}" + "".join(f"{k:>10}" for k in keys) + f"{'length':>10}"
    rows = [head, "-" * len(head)]
    for name, r in _rows(results):
        rows.append(f"{name:<28}{r['problems']:>9}" + "".join(
            f"{100 * r[k]:>9.2f}%" if k in r else f"{'':>10}" for k in keys) + f"{r.get('mean_length', math.nan):>10.1f}")
    return "\n".join(rows)


def _pct(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _num(x, fmt="{:.3f}") -> str:
    return "-" if x is None or not np.isfinite(x) else fmt.format(x)


def format_markdown(results: Mapping[str, dict], settings: EvalSettings, title: str = "",
                    figures: Sequence[str] = ()) -> str:
    """The Markdown report: the accuracy table (and the meta-awareness table when there is one)."""
    keys = _pass_keys(results)
    lines = [f"# {title or 'Evaluation'}", "",
             f"Protocol: {settings.describe()}. pass@1 = mean accuracy over the samples; pass@k = unbiased "
             "estimator 1 - C(n-c, k) / C(n, k), averaged over problems; **average** = unweighted mean over the "
             "benchmarks. Numbers in %.", "",
             "| benchmark | problems | " + " | ".join(keys) + " | mean length | at token limit |",
             "|---|---:|" + "---:|" * len(keys) + "---:|---:|"]
    for name, r in _rows(results):
        label = f"**{name}**" if name == AVERAGE else name
        lines.append(f"| {label} | {r['problems']} | " + " | ".join(_pct(r.get(k)) for k in keys)
                     + f" | {_num(r.get('mean_length'), '{:.1f}')} | {_pct(r.get('at_token_limit'))} |")
    metas = [(name, r["meta"]) for name, r in _rows(results) if "meta" in r]
    if metas:
        m0 = metas[0][1]
        lines += ["", "## Meta-awareness", "",
                  f"{m0['num_meta']} meta answers per problem. Pass rate: the mean parsed prediction against the "
                  "accuracy of the solutions (MAE, Pearson r, over problems with a parsed prediction). Length: "
                  "the mean parsed prediction against the mean length of the correct solutions (tokens). Gating "
                  f"at std < {m0['gate_std']:g}, tolerance {m0['gate_tol']:g}: precision = share of gated problems "
                  "that really were all right / all wrong as predicted; recall = share of the all-right / all-wrong "
                  "problems gated; skipped = solution samples (tokens) gating would have saved. "
                  "**average** pools all problems.", "",
                  "| benchmark | parsed pass / length | pass MAE | pass r | length MAE | length r | gated | "
                  "gate precision | gate recall | skipped samples (tokens) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in metas:
            label = f"**{name}**" if name == AVERAGE else name
            lines.append(
                f"| {label} | {_pct(m['parse_rate_pass'])} / {_pct(m['parse_rate_length'])} | "
                f"{_num(m['pass_mae'])} | {_num(m['pass_pearson'])} | {_num(m['length_mae'], '{:.1f}')} | "
                f"{_num(m['length_pearson'])} | {m['gated']} of {m['problems']} | {_pct(m['gate_precision'])} | "
                f"{_pct(m['gate_recall'])} | {m['gate_skipped_samples']} ({m['gate_skipped_tokens']}) |")
        if figures:
            lines += ["", "Figures: " + ", ".join(f"`{os.path.basename(f)}`" for f in figures)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- the run


def run_protocol(benchmarks: Mapping[str, Sequence[sources.Problem]], generate: Callable, codec, verify: Callable,
                 settings: EvalSettings, *, config, rng_fn: Callable[[int, str], Any]) -> tuple[dict, dict]:
    """Samples and scores every benchmark (and, with settings.meta, its meta path). `generate(prompt_ids,
    budgets, max_new_tokens, rng)` is the sampler at the protocol's settings; `rng_fn(i, kind)` the key of
    benchmark i for "solution" / "meta". Returns (results: benchmark -> numbers, plus "average" and
    "settings"; meta reports: benchmark -> `meta_eval.MetaReport`)."""
    from masa_jax.evaluation import meta_eval, scoring

    results: dict = {}
    reports: dict = {}
    pooled: tuple[list, list, list] = ([], [], [])
    for i, (name, problems) in enumerate(benchmarks.items()):
        correct, lengths = scoring.sample_and_score(
            problems, generate, codec, verify, n=settings.n, max_new_tokens=settings.max_new_tokens,
            rng=rng_fn(i, "solution"), solution_template=settings.solution_template(config))
        results[name] = score(correct, lengths, settings.ks, settings.max_new_tokens)
        if settings.meta:
            ms = meta_eval.meta_settings(config)
            preds, _ = meta_eval.sample_meta(problems, generate, codec, num_meta=settings.num_meta,
                                             rng=rng_fn(i, "meta"), **ms)
            reports[name] = meta_eval.calibration(preds, correct, lengths, meta_eval.control_config(config))
            for acc, part in zip(pooled, (preds, correct, lengths)):
                acc.append(part)
            reports[name].per_problem["uid"] = np.array([p.uid for p in problems], dtype=object)
            results[name]["meta"] = reports[name].summary
    results[AVERAGE] = average(results)
    if reports:  # calibration over all problems of all benchmarks
        results[AVERAGE]["meta"] = meta_eval.calibration(
            sum(pooled[0], []), np.concatenate(pooled[1]), np.concatenate(pooled[2]),
            meta_eval.control_config(config)).summary
    results[SETTINGS] = dataclasses.asdict(settings)
    return results, reports


def write_outputs(results: dict, reports: dict, out_json: str, title: str = "") -> dict:
    """Writes the JSON (`out_json`), the Markdown next to it (same stem, .md) and with meta reports the
    per-problem predictions (<stem>_meta.jsonl) and the calibration figures (<stem>_calibration.png,
    <stem>_length_calibration.png). Returns {kind: path}."""
    from masa_jax.evaluation import meta_eval

    stem = out_json[:-len(".json")] if out_json.endswith(".json") else out_json
    paths = {"json": out_json, "markdown": stem + ".md"}
    figures: list[str] = []
    if reports:
        pooled = meta_eval.concat(list(reports.values()))
        figures = meta_eval.write_figures(reports, pooled, stem + "_", title)
        paths["meta_jsonl"] = stem + "_meta.jsonl"
        with open(paths["meta_jsonl"], "w") as f:
            for name, report in reports.items():
                pp = report.per_problem
                for j in range(len(pp["true_pass"])):
                    f.write(json.dumps(metrics_lib.to_json_value(
                        {"benchmark": name, **{k: (v[j] if k == "uid" else v[j].item()) for k, v in pp.items()}})) + "\n")
    for fig in figures:
        paths[os.path.basename(fig)[len(os.path.basename(stem)) + 1:-len(".png")]] = fig
    settings = EvalSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in results[SETTINGS].items()})
    with open(out_json, "w") as f:
        json.dump(metrics_lib.to_json_value(results), f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(format_markdown(results, settings, title, figures))
    return paths
