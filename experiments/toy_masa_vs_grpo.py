"""GRPO vs MASA vs MASA-efficient on the toy world, from the same shipped base model, several seeds.

    python experiments/toy_masa_vs_grpo.py [--seeds 0,1,2] [--steps 60] [--heldout 64]

Each (algorithm, seed) is a full `masa_jax.train` run of configs/tiny.py, for twice the default run's 30
steps: on this world the meta path's predictions agree enough to gate only from step ~32-51
(docs/results.md). Before training (the base model) and after each run, a held-out evaluation rolls out
the meta path (M predictions per problem) and the solution path (G samples per problem) on fixed
held-out toy problems — for every algorithm, GRPO included (its meta path is evaluated but never
trained) — and measures accuracy and the calibration of the predicted pass rate (mean |predicted -
actual|). Writes a results JSON, figures and the tables of docs/results.md (the "GRPO vs MASA" section
is replaced, the rest of the file kept). A finished run leaves `experiment_run.json` in its workdir;
invoking the script again reuses it (a different --steps or --heldout is an error), so an interrupted
sweep resumes where it stopped — delete the workdir to rerun from scratch.
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

from masa_jax import config as config_lib, evaluate, metrics as metrics_lib, train  # noqa: E402
from masa_jax.rewards import math as math_reward  # noqa: E402
from masa_jax.rl import rollout as rollout_lib  # noqa: E402
from masa_jax.sampling.generate import generate as sampling_generate  # noqa: E402
from masa_jax.tokenization import load_codec  # noqa: E402
from masa_jax.toy import defaults, world  # noqa: E402

SECTION = "## GRPO vs MASA vs MASA-efficient (toy world)"


def tiny_config(algorithm: str, seed: int, steps: int):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import tiny  # configs/tiny.py
    c = tiny.get_config()
    c.algorithm, c.seed, c.total_steps = algorithm, seed, steps
    c.log.tensorboard = False
    return c


def heldout_eval(config, checkpoint: str, problems, verifier, seed: int) -> dict:
    """Accuracy and pass-rate calibration of the policy at `checkpoint` (a run dir or an HF dir)."""
    config = config_lib.resolve(config)  # fills model.tokenizer_path from model.path
    model_cfg, params, mesh = evaluate.load_policy(config, checkpoint)
    codec = load_codec(config.model.tokenizer_path)
    rcfg = dataclasses.replace(train.rollout_config(config), use_meta=True)
    r = config.rollout

    def generate(prompt_ids, budgets, max_new_tokens, rng):
        return sampling_generate(model_cfg, params, prompt_ids, rng=rng, max_new_tokens=max_new_tokens,
                                 temperature=r.temperature, top_p=r.top_p, eos_ids=codec.eos_ids,
                                 num_slots=r.num_slots, mesh=mesh)

    ro = rollout_lib.run_rollouts(problems, generate=generate, codec=codec, verify=verifier.verify, cfg=rcfg,
                                  efficient_active=False, rng=jax.random.key(10_000 + seed))
    pred, true = ro.controls.pred_pass_mean, ro.correct.mean(axis=1)
    ok = np.isfinite(pred)
    return {"accuracy": float(ro.correct.mean()), "pass_mae": float(np.abs(pred[ok] - true[ok]).mean()) if ok.any()
            else None, "parsed_fraction": float(ok.mean()), "pred": pred.tolist(), "true": true.tolist(),
            "meta_total": float(np.nanmean(ro.meta_rewards["total"]))}


def run_all(args) -> dict:
    algorithms = args.algorithms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    problems = list(world.heldout(args.heldout, seed=4321))
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
                    if (run.get("steps"), run.get("heldout_n")) != (args.steps, args.heldout):
                        # Training in that workdir would resume its finished checkpoint, not start afresh.
                        raise SystemExit(f"{done_file} is a run of {run.get('steps')} steps / {run.get('heldout_n')} "
                                         f"held-out problems, not {args.steps} / {args.heldout}: delete {workdir} "
                                         "or pass another --workdir")
                    results["runs"][f"{algorithm}/{seed}"] = run
                    print(algorithm, seed, "reused", done_file, flush=True)
                    continue
                config = tiny_config(algorithm, seed, args.steps)
                t0 = time.perf_counter()
                history = train.train(config, workdir)
                wall = time.perf_counter() - t0
                ev = heldout_eval(config, workdir, problems, verifier, seed)
                run = {"algorithm": algorithm, "seed": seed, "steps": args.steps, "heldout_n": args.heldout,
                       "wall_s": wall, "history": history, "heldout": ev}
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


def _smooth(y, w=5):
    y = np.where(np.isfinite(y), y, np.nan)
    return np.array([np.nanmean(y[max(0, i - w + 1):i + 1]) for i in range(len(y))])


def figures(results: dict, fig_dir: str) -> list[str]:
    os.makedirs(fig_dir, exist_ok=True)
    by_alg: dict[str, list] = {}
    for run in results["runs"].values():
        by_alg.setdefault(run["algorithm"], []).append(run)
    paths = []
    for x, label in (("step", "step"), ("wall", "wall-clock seconds"), ("tokens", "generated tokens")):
        series = {}
        for alg, runs in by_alg.items():
            s = _series(runs, "acc/solution", x)
            xs = np.mean([a for a, _ in s], axis=0)
            ys = np.array([_smooth(b) for _, b in s])
            series[alg] = (xs, np.nanmean(ys, axis=0), np.nanstd(ys, axis=0))
        path = os.path.join(fig_dir, f"toy_accuracy_vs_{x}.png")
        metrics_lib.plot_curves(series, label, "training accuracy (5-step mean)", path,
                                title=f"toy world: accuracy vs {label}")
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


def summarise(results: dict) -> dict:
    by_alg: dict[str, list] = {}
    for run in results["runs"].values():
        by_alg.setdefault(run["algorithm"], []).append(run)
    switch = tiny_config("masa_efficient", 0, results["steps"]).efficient.switch_step
    s = {"base_pass_mae": results["base"]["pass_mae"], "base_accuracy": results["base"]["accuracy"]}
    for alg, runs in by_alg.items():
        acc = [r["heldout"]["accuracy"] for r in runs]
        mae = [r["heldout"]["pass_mae"] for r in runs]
        sol_tokens = [sum(h.get("tokens/solution", 0.0) for h in r["history"]) for r in runs]
        gated = [np.nanmean([h["gate/fraction"] for h in r["history"] if h["step"] > switch and "gate/fraction" in h])
                 if alg == "masa_efficient" else None for r in runs]
        s[alg] = {"accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                  "pass_mae_mean": float(np.mean(mae)), "pass_mae_std": float(np.std(mae)),
                  "solution_tokens_mean": float(np.mean(sol_tokens)),
                  "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
                  "gated_after_switch_mean": None if gated[0] is None else float(np.mean(gated))}
    return s


def bars(s: dict) -> list[tuple[str, bool | None, str]]:
    out = []
    base = s["base_pass_mae"]
    if "masa" in s:
        drop = 1 - s["masa"]["pass_mae_mean"] / base
        out.append(("MASA: held-out pass-rate MAE falls >= 30 % from the base model", drop >= 0.30,
                    f"{base:.3f} -> {s['masa']['pass_mae_mean']:.3f} ({-100 * drop:+.0f} %)"))
    if "grpo" in s:
        drop = 1 - s["grpo"]["pass_mae_mean"] / base
        out.append(("GRPO: held-out pass-rate MAE does not fall >= 30 %", drop < 0.30,
                    f"{base:.3f} -> {s['grpo']['pass_mae_mean']:.3f} ({-100 * drop:+.0f} %)"))
    if "masa_efficient" in s:
        g = s["masa_efficient"]["gated_after_switch_mean"]
        out.append(("MASA-efficient gates 15-45 % of problems after the switch-over", 0.15 <= g <= 0.45,
                    f"{100 * g:.1f} %"))
        if "masa" in s:
            saved = 1 - s["masa_efficient"]["solution_tokens_mean"] / s["masa"]["solution_tokens_mean"]
            out.append(("MASA-efficient generates >= 25 % fewer solution tokens than MASA", saved >= 0.25,
                        f"{100 * saved:.1f} % fewer"))
            gap = 100 * (s["masa_efficient"]["accuracy_mean"] - s["masa"]["accuracy_mean"])
            out.append(("MASA-efficient ends within 2 accuracy points of MASA", abs(gap) <= 2.0 or gap > 0,
                        f"{gap:+.1f} points"))
    return out


def markdown(results: dict, s: dict, fig_paths: list[str], command: str) -> str:
    lines = [SECTION, "", f"Command: `{command}` (2-core CPU, {time.strftime('%Y-%m-%d')}). "
             f"{results['steps']} steps per run, seeds {results['seeds']}, {results['heldout']} held-out "
             "problems (8 meta predictions and 8 solution samples each, temperature 1).", "",
             "| policy | held-out accuracy | pass-rate MAE | solution tokens (run) | gated after switch | wall s |",
             "|---|---:|---:|---:|---:|---:|",
             f"| base model | {100 * s['base_accuracy']:.1f} % | {s['base_pass_mae']:.3f} | | | |"]
    for alg in ("grpo", "masa", "masa_efficient"):
        if alg in s:
            a = s[alg]
            g = "" if a["gated_after_switch_mean"] is None else f"{100 * a['gated_after_switch_mean']:.1f} %"
            lines.append(f"| {alg} | {100 * a['accuracy_mean']:.1f} ± {100 * a['accuracy_std']:.1f} % | "
                         f"{a['pass_mae_mean']:.3f} ± {a['pass_mae_std']:.3f} | {a['solution_tokens_mean']:,.0f} | "
                         f"{g} | {a['wall_s_mean']:.0f} |")
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
        text = text[:start] + section + ("" if nxt < 0 else text[nxt + 1:])
    else:
        text = text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algorithms", default="grpo,masa,masa_efficient")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=64)
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
