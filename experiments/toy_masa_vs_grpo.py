"""GRPO vs MASA vs MASA-efficient on the toy world, from the same shipped base model, several seeds.

    python experiments/toy_masa_vs_grpo.py [--seeds 0,1,2] [--steps 30] [--heldout 100] [--eval_every 5]

Each (algorithm, seed) is a full `masa_jax.train` run of configs/tiny.py. Every run evaluates its own
held-out accuracy (`eval.*`: the same held-out problems, before the first step, every --eval_every steps
and after the last; training seconds exclude the evaluations): that gives the accuracy and the
accuracy-vs-training-time curves and bars. After each run (and for the base model) a second held-out
evaluation rolls out the meta path (M predictions per problem) and the solution path (G samples) to
measure the calibration of the predicted pass rate (mean |predicted - actual|) — for every algorithm,
GRPO included (its meta path is evaluated but never trained). Writes a results JSON, figures and the
tables of docs/results.md (the "GRPO vs MASA" section is replaced, the rest of the file kept). A finished
run leaves `experiment_run.json` in its workdir; invoking the script again reuses it (a different --steps,
--heldout or --eval_every is an error), so an interrupted sweep resumes where it stopped — delete the
workdir to rerun from scratch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from masa_jax import components, config as config_lib, metrics as metrics_lib, train  # noqa: E402
from masa_jax.evaluation import policy  # noqa: E402
from masa_jax.rewards import math as math_reward  # noqa: E402
from masa_jax.rl import rollout as rollout_lib  # noqa: E402
from masa_jax.tokenization import load_codec  # noqa: E402
from masa_jax.toy import defaults, world  # noqa: E402

SECTION = "## GRPO vs MASA vs MASA-efficient (toy world)"


HELDOUT_SEED = 4321  # the experiment's held-out problems: world.heldout(n, seed=4321), never trained on


def tiny_config(algorithm: str, seed: int, steps: int, heldout: int = 0, eval_every: int = 0):
    """configs/tiny.py with this run's algorithm / seed / length; with `heldout` > 0 the run evaluates
    held-out accuracy itself (before the first step, every `eval_every` steps and after the last)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import tiny  # configs/tiny.py
    c = tiny.get_config()
    c.algorithm, c.seed, c.total_steps = algorithm, seed, steps
    c.log.tensorboard = False
    if heldout:
        c.eval.files = (f"toy-heldout:{heldout}:{HELDOUT_SEED}",)
        c.eval.every = eval_every
    return c


def read_evals(workdir: str) -> list[dict]:
    """The run's held-out evaluations (eval.jsonl): step, train_time_s (RL steps only), eval/accuracy..."""
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_eval(config, checkpoint: str, problems, verifier, seed: int) -> dict:
    """Accuracy and pass-rate calibration of the policy at `checkpoint` (a run dir or an HF dir)."""
    config = config_lib.resolve(config)  # fills model.tokenizer_path from model.path
    model_cfg, params, mesh = policy.load_policy(config, checkpoint)
    codec = load_codec(config.model.tokenizer_path)
    rcfg = dataclasses.replace(components.rollout_config(config), use_meta=True)
    engine = components.rollout_engine_for(config, model_cfg, codec.eos_ids, mesh, params)  # the run's sampler
    ro = rollout_lib.run_rollouts(problems, generate=engine.generate, codec=codec, verify=verifier.verify, cfg=rcfg,
                                  efficient_active=False, rng=jax.random.key(10_000 + seed))
    pred, true = ro.controls.pred_pass_mean, ro.correct.mean(axis=1)
    ok = np.isfinite(pred)
    return {"accuracy": float(ro.correct.mean()), "pass_mae": float(np.abs(pred[ok] - true[ok]).mean()) if ok.any()
            else None, "parsed_fraction": float(ok.mean()), "pred": pred.tolist(), "true": true.tolist(),
            "meta_total": float(np.nanmean(ro.meta_rewards["total"]))}


def run_all(args) -> dict:
    algorithms = args.algorithms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    problems = list(world.heldout(args.heldout, seed=HELDOUT_SEED))
    verifier = math_reward.MathVerifier(num_workers=1)
    results = {"steps": args.steps, "seeds": seeds, "heldout": args.heldout, "runs": {}}
    try:
        base_cfg = tiny_config("masa", 0, args.steps)
        results["base"] = heldout_eval(base_cfg, defaults.BASE_MODEL_DIR, problems, verifier, 0)
        print("base", {k: v for k, v in results["base"].items() if k not in ("pred", "true")}, flush=True)
        for algorithm in algorithms:
            for seed in seeds:
                workdir = os.path.join(args.workdir, f"{algorithm}_s{seed}")
                done_file = os.path.join(workdir, "experiment_run.json")
                if os.path.exists(done_file):  # finished in an earlier invocation: a long sweep can resume
                    with open(done_file) as f:
                        run = json.load(f)
                    if (run.get("steps"), run.get("heldout_n"), run.get("eval_every")) != (
                            args.steps, args.heldout, args.eval_every):
                        # Training in that workdir would resume its finished checkpoint, not start afresh.
                        raise SystemExit(f"{done_file} is a run of {run.get('steps')} steps / {run.get('heldout_n')} "
                                         f"held-out problems / eval every {run.get('eval_every')}, not "
                                         f"{args.steps} / {args.heldout} / {args.eval_every}: delete {workdir} "
                                         "or pass another --workdir")
                    results["runs"][f"{algorithm}/{seed}"] = run
                    print(algorithm, seed, "reused", done_file, flush=True)
                    continue
                config = tiny_config(algorithm, seed, args.steps, args.heldout, args.eval_every)
                t0 = time.perf_counter()
                history = train.train(config, workdir)
                wall = time.perf_counter() - t0
                ev = heldout_eval(config, workdir, problems, verifier, seed)
                run = {"algorithm": algorithm, "seed": seed, "steps": args.steps, "heldout_n": args.heldout,
                       "eval_every": args.eval_every, "wall_s": wall, "history": history, "heldout": ev,
                       "evals": read_evals(workdir)}
                with open(done_file, "w") as f:
                    json.dump(run, f, default=float)
                results["runs"][f"{algorithm}/{seed}"] = run
                print(algorithm, seed, f"{wall:.0f}s", {k: v for k, v in ev.items() if k not in ("pred", "true")},
                      flush=True)
    finally:
        verifier.close()
    return results


def _series(runs, key, x="step"):
    """Per-seed arrays of `key` against step / cumulative wall-clock / cumulative generated tokens."""
    out = []
    for run in runs:
        h = run["history"]
        y = np.array([r.get(key, np.nan) if r.get(key) is not None else np.nan for r in h], float)
        if x == "step":
            xs = np.array([r["step"] for r in h], float)
        elif x == "wall":
            xs = np.cumsum([r.get("time/step_s", 0.0) for r in h])
        else:
            xs = np.cumsum([r.get("tokens/solution", 0.0) + r.get("tokens/meta", 0.0) for r in h])
        out.append((xs, y))
    return out


def _eval_curve(runs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds of the in-run held-out evaluations: (step, training seconds, accuracy mean, std)."""
    evals = [r["evals"] for r in runs]
    n = min(len(e) for e in evals)
    steps = np.array([e["step"] for e in evals[0][:n]], float)
    secs = np.mean([[e["train_time_s"] for e in ev[:n]] for ev in evals], axis=0)
    acc = np.array([[e["eval/accuracy"] for e in ev[:n]] for ev in evals])
    return steps, secs, acc.mean(axis=0), acc.std(axis=0)


def time_to_reach(secs: np.ndarray, acc: np.ndarray, target: float) -> float:
    """Training seconds of the first evaluation at or above `target` (inf: never)."""
    hit = np.flatnonzero(acc >= target - 1e-12)
    return float(secs[hit[0]]) if hit.size else float("inf")


def summarise(results: dict) -> dict:
    by_alg: dict[str, list] = {}
    for run in results["runs"].values():
        by_alg.setdefault(run["algorithm"], []).append(run)
    switch = tiny_config("masa_efficient", 0, results["steps"]).efficient.switch_step
    s = {"base_pass_mae": results["base"]["pass_mae"], "base_accuracy": results["base"]["accuracy"]}
    for alg, runs in by_alg.items():
        start = [r["evals"][0]["eval/accuracy"] for r in runs]
        final = [r["evals"][-1]["eval/accuracy"] for r in runs]
        mae = [r["heldout"]["pass_mae"] for r in runs]
        sol_tokens = [sum(h.get("tokens/solution", 0.0) for h in r["history"]) for r in runs]
        # Mean gated fraction after the switch-over (nan when the run ended before it).
        after = [[h["gate/fraction"] for h in r["history"] if h["step"] > switch and "gate/fraction" in h]
                 for r in runs]
        gated = [float(np.mean(a)) if a else float("nan") if alg == "masa_efficient" else None for a in after]
        steps, secs, acc, _ = _eval_curve(runs)
        s[alg] = {"start_accuracy_mean": float(np.mean(start)), "accuracy_mean": float(np.mean(final)),
                  "accuracy_std": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0, "accuracy": final,
                  "pass_mae_mean": float(np.mean(mae)), "pass_mae_std": float(np.std(mae)),
                  "solution_tokens_mean": float(np.mean(sol_tokens)),
                  "train_s_mean": float(np.mean([r["evals"][-1]["train_time_s"] for r in runs])),
                  "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
                  "best_accuracy": float(acc.max()), "best_at_s": time_to_reach(secs, acc, acc.max()),
                  "eval_steps": steps.tolist(), "eval_secs": secs.tolist(), "eval_acc": acc.tolist(),
                  "gated_after_switch_mean": None if gated[0] is None else float(np.mean(gated))}
    return s


def bars(s: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    base = s["base_pass_mae"]
    if "grpo" in s:
        g = s["grpo"]
        rise = 100 * (g["accuracy_mean"] - g["start_accuracy_mean"])
        out.append(("GRPO: held-out accuracy rises >= 10 points", rise >= 10.0,
                    f"{100 * g['start_accuracy_mean']:.1f} % -> {100 * g['accuracy_mean']:.1f} % ({rise:+.1f} points)"))
    for alg in ("masa", "masa_efficient"):
        if alg in s:
            drop = 1 - s[alg]["pass_mae_mean"] / base
            out.append((f"{alg}: held-out pass-rate MAE falls >= 30 % from the base model", drop >= 0.30,
                        f"{base:.3f} -> {s[alg]['pass_mae_mean']:.3f} ({-100 * drop:+.0f} %)"))
    if "grpo" in s:
        drop = 1 - s["grpo"]["pass_mae_mean"] / base
        out.append(("GRPO: held-out pass-rate MAE does not fall >= 30 %", drop < 0.30,
                    f"{base:.3f} -> {s['grpo']['pass_mae_mean']:.3f} ({-100 * drop:+.0f} %)"))
    if "masa" in s and "grpo" in s:
        a, b = np.array(s["masa"]["accuracy"]), np.array(s["grpo"]["accuracy"])
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if min(len(a), len(b)) > 1 else float("nan")
        gap = 100 * (a.mean() - b.mean())
        significant = abs(gap) >= 2 * 100 * se
        out.append(("MASA: final held-out accuracy >= GRPO's", gap >= 0,
                    f"{gap:+.1f} ± {100 * se:.1f} points (difference of seed means ± its standard error; "
                    f"{'more' if significant else 'less'} than 2 standard errors)"))
    if "masa_efficient" in s:
        e = s["masa_efficient"]
        g = e["gated_after_switch_mean"]
        out.append(("MASA-efficient gates 15-45 % of problems after the switch-over", 0.15 <= g <= 0.45,
                    f"{100 * g:.1f} %"))
        if "grpo" in s:
            grpo = s["grpo"]
            t_eff = time_to_reach(np.array(e["eval_secs"]), np.array(e["eval_acc"]), grpo["best_accuracy"])
            ratio = t_eff / grpo["best_at_s"] if grpo["best_at_s"] > 0 else float("inf")
            out.append(("MASA-efficient reaches GRPO's best held-out accuracy in <= 0.8x GRPO's training time",
                        ratio <= 0.8, f"GRPO best {100 * grpo['best_accuracy']:.1f} % at {grpo['best_at_s']:.0f} s; "
                        f"MASA-efficient " + (f"at {t_eff:.0f} s ({ratio:.2f}x)" if np.isfinite(t_eff)
                                              else "never (within the run)")))
            saved = 1 - e["solution_tokens_mean"] / grpo["solution_tokens_mean"]
            out.append(("MASA-efficient generates >= 25 % fewer solution tokens than GRPO", saved >= 0.25,
                        f"{100 * saved:.1f} % fewer"))
    return out


def figures(results: dict, fig_dir: str) -> list[str]:
    os.makedirs(fig_dir, exist_ok=True)
    by_alg: dict[str, list] = {}
    for run in results["runs"].values():
        by_alg.setdefault(run["algorithm"], []).append(run)
    paths = []
    for x, label in (("step", "step"), ("secs", "training seconds (evaluations excluded)")):
        series = {}
        for alg, runs in by_alg.items():
            steps, secs, acc, std = _eval_curve(runs)
            series[alg] = (steps if x == "step" else secs, acc, std)
        path = os.path.join(fig_dir, f"toy_heldout_accuracy_vs_{'step' if x == 'step' else 'wall'}.png")
        metrics_lib.plot_curves(series, label, "held-out accuracy (mean over seeds)", path,
                                title=f"toy world: held-out accuracy vs {label.split(' (')[0]}")
        paths.append(path)
    series = {}
    for alg, runs in by_alg.items():
        s = _series(runs, "gate/fraction")
        if all(np.isfinite(b).any() for _, b in s):
            ys = np.array([b for _, b in s])
            series[alg] = (s[0][0], np.nanmean(ys, axis=0), np.nanstd(ys, axis=0))
    if series:
        path = os.path.join(fig_dir, "toy_gated_fraction.png")
        metrics_lib.plot_curves(series, "step", "fraction of problems gated", path, title="predictive gating")
        paths.append(path)
    panels = [("base", results["base"])] + [(alg, runs[0]["heldout"]) for alg, runs in by_alg.items()]
    path = os.path.join(fig_dir, "toy_calibration.png")
    metrics_lib.plot_calibration([p["pred"] for _, p in panels], [p["true"] for _, p in panels], path,
                                 "held-out: predicted vs actual pass rate (seed 0)",
                                 panel_titles=[name for name, _ in panels])
    paths.append(path)
    return paths


def markdown(results: dict, s: dict, fig_paths: list[str], command: str) -> str:
    lines = [SECTION, "", f"Command: `{command}` (2-core CPU, {time.strftime('%Y-%m-%d')}). "
             f"{results['steps']} steps per run, seeds {results['seeds']}, {results['heldout']} held-out "
             "problems: accuracy from the run's own evaluations (4 samples each, temperature 1, before the "
             "first step and every few steps), calibration from 8 meta predictions and 8 solution samples each "
             "after the run. Mean ± sample std over seeds; training seconds exclude the evaluations.", "",
             "| policy | held-out accuracy start -> end | pass-rate MAE | solution tokens (run) | gated after switch "
             "| training s |", "|---|---:|---:|---:|---:|---:|",
             f"| base model | {100 * s['base_accuracy']:.1f} % | {s['base_pass_mae']:.3f} | | | |"]
    for alg in ("grpo", "masa", "masa_efficient"):
        if alg in s:
            a = s[alg]
            g = "" if a["gated_after_switch_mean"] is None else f"{100 * a['gated_after_switch_mean']:.1f} %"
            lines.append(f"| {alg} | {100 * a['start_accuracy_mean']:.1f} -> {100 * a['accuracy_mean']:.1f} ± "
                         f"{100 * a['accuracy_std']:.1f} % | {a['pass_mae_mean']:.3f} ± {a['pass_mae_std']:.3f} | "
                         f"{a['solution_tokens_mean']:,.0f} | {g} | {a['train_s_mean']:.0f} |")
    lines += ["", "| bar | met | measured |", "|---|---|---|"]
    for name, met, measured in bars(s):
        lines.append(f"| {name} | {'met' if met else 'NOT met'} | {measured} |")
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.join(REPO, 'docs'))})" for p in fig_paths]
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# Results\n\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    else:
        text = text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algorithms", default="grpo,masa,masa_efficient")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=30, help="RL steps per run (30: the default run's budget)")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--eval_every", type=int, default=5, help="in-run held-out evaluation every N steps")
    ap.add_argument("--workdir", default=os.path.join(REPO, "runs", "toy_masa_vs_grpo"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "results_toy.json"))
    args = ap.parse_args()
    results = run_all(args)
    s = summarise(results)
    fig_paths = figures(results, os.path.join(REPO, "docs", "figures"))
    with open(args.out, "w") as f:
        json.dump({"summary": s, "bars": bars(s), **results}, f, default=float)
    command = "python experiments/toy_masa_vs_grpo.py " + " ".join(sys.argv[1:])
    write_section(os.path.join(REPO, "docs", "results.md"), markdown(results, s, fig_paths, command.strip()))
    for name, met, measured in bars(s):
        print(f"{'MET    ' if met else 'NOT MET'} {name}: {measured}")


if __name__ == "__main__":
    main()
