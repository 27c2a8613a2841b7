"""Meta-awareness of a checkpoint on evaluation problems (``python -m masa_jax.evaluate --meta``).

For every problem the model answers the meta prompt M times (the training run's meta prompt and
meta_max_new_tokens, sampled at the evaluation's temperature / top-p); `meta.parse` reads each answer. Against what its n solutions then really do:

* pass rate: predicted = mean of the parsed `pass_rate`s (fractions), actual = accuracy of the n
  solutions. MAE and Pearson r over the problems with at least one parsed prediction; the scatter is
  the paper's Figure 2 (`metrics.plot_calibration`).
* length: predicted = mean of the parsed `solution_length`s, actual = mean length (tokens) of the
  problem's correct solutions (what the meta prompt asks for); problems without a correct solution or
  without a parsed length are left out. MAE (tokens) and Pearson r.
* gating at the configured thresholds (`config.efficient.gate_std` / `gate_tol`, `rl.controls.gate_mask`):
  which problems MASA-efficient would have skipped, and its precision, the share of gated problems
  whose n solutions were really all right (gated as predicted all right) or all wrong (gated as
  predicted all wrong), as the trainer's `gate/would_gate_precision`; recall: the share of the
  all-right / all-wrong problems that were gated; the solution samples and tokens gating would have
  saved.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np

from masa_jax import metrics as metrics_lib
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl import prompts
from masa_jax.rl import controls as controls_lib
from masa_jax.rl.rollout_engine import GenerateFn


@dataclasses.dataclass
class MetaReport:
    """`summary`: the numbers of one benchmark (JSON-ready); `per_problem`: arrays [P] (pred_pass, true_pass,
    pred_length, true_length, gated, n_parsed)."""

    summary: dict
    per_problem: dict


def meta_settings(config) -> dict:
    """The meta-prompt knobs of a masa_jax config, as the trainer's rollouts use them."""
    return dict(k=int(config.meta.k), max_length=int(config.rollout.max_response_length),
                min_length=int(config.prompts.min_solution_length), template=config.prompts.meta_template or None,
                max_new_tokens=int(config.rollout.meta_max_new_tokens))


def control_config(config) -> controls_lib.ControlConfig:
    e = config.efficient
    return controls_lib.ControlConfig(gate_std=e.gate_std, gate_tol=e.gate_tol, cutoff_factor=e.cutoff_factor,
                                      max_hint_notions=e.max_hint_notions)


def sample_meta(problems: Sequence, generate: GenerateFn, codec, *, num_meta: int, rng, k: int, max_length: int,
                min_length: int, template: str | None, max_new_tokens: int
                ) -> tuple[list[list[meta_lib.MetaPrediction]], list[list[str]]]:
    """num_meta answers to the meta prompt per problem, parsed: (predictions [P][M], texts [P][M])."""
    prompt_ids = [codec.encode_chat(prompts.meta_prompt(p.question, max_length=max_length, k=k,
                                                        min_length=min_length, template=template))
                  for p in problems]
    out = generate([ids for ids in prompt_ids for _ in range(num_meta)], None, max_new_tokens, rng)
    texts = [codec.decode(t[:-1] if r == "eos" and t else t) for t, r in zip(out.tokens, out.finish_reasons)]
    rows = [texts[i * num_meta:(i + 1) * num_meta] for i in range(len(problems))]
    return [[meta_lib.parse(t, k=k) for t in row] for row in rows], rows


def _nanmean(x: np.ndarray, axis=None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
    keep = np.isfinite(pred) & np.isfinite(true)
    return float(np.mean(np.abs(pred[keep] - true[keep]))) if keep.any() else math.nan


def calibration(preds: Sequence[Sequence[meta_lib.MetaPrediction]], correct: np.ndarray, lengths: np.ndarray,
                control: controls_lib.ControlConfig = controls_lib.ControlConfig()) -> MetaReport:
    """Calibration and would-be gating of meta predictions [P][M] against the solutions' correct bool [P, n]
    and lengths int [P, n] (module doc)."""
    correct = np.asarray(correct, bool)
    lengths = np.asarray(lengths, np.float64)
    P = len(preds)
    if correct.shape[0] != P or lengths.shape != correct.shape:
        raise ValueError(f"{P} prediction rows, correct {correct.shape}, lengths {lengths.shape}")
    n = correct.shape[1] if correct.ndim == 2 else 0
    pred_pass, pass_std, n_valid, pred_len = controls_lib.predicted_stats(preds)
    true_pass = correct.mean(axis=1) if n else np.full(P, np.nan)
    true_len = _nanmean(np.where(correct, lengths, np.nan), axis=1) if n else np.full(P, np.nan)
    gated = controls_lib.gate_mask(pred_pass, pass_std, n_valid, control) if P else np.zeros(0, bool)
    all_right, all_wrong = true_pass == 1.0, true_pass == 0.0
    predicted_right = pred_pass >= 0.5
    gate_right = gated & np.where(predicted_right, all_right, all_wrong)
    zero_var = all_right | all_wrong
    flat = [q for row in preds for q in row]
    share = lambda f: float(np.mean([f(q) for q in flat])) if flat else math.nan
    has_pass = np.isfinite(pred_pass)
    has_len = np.isfinite(pred_len) & np.isfinite(true_len)
    summary = {
        "problems": P,
        "num_meta": len(preds[0]) if P else 0,
        "parse_rate_pass": share(lambda q: q.pass_rate is not None),
        "parse_rate_length": share(lambda q: q.length is not None),
        "parse_rate_notion": share(lambda q: q.notions is not None),
        "pass_problems": int(has_pass.sum()),
        "pass_mae": _mae(pred_pass, true_pass),
        "pass_pearson": metrics_lib.pearson(pred_pass, true_pass),
        "pred_pass_mean": float(np.mean(pred_pass[has_pass])) if has_pass.any() else math.nan,
        "true_pass_mean": float(np.mean(true_pass)) if P else math.nan,
        "length_problems": int(has_len.sum()),
        "length_mae": _mae(pred_len, true_len),
        "length_pearson": metrics_lib.pearson(pred_len, true_len),
        "pred_length_mean": float(np.mean(pred_len[has_len])) if has_len.any() else math.nan,
        "true_length_mean": float(np.mean(true_len[has_len])) if has_len.any() else math.nan,
        "gate_std": float(control.gate_std),
        "gate_tol": float(control.gate_tol),
        "gated": int(gated.sum()),
        "gated_fraction": float(gated.mean()) if P else math.nan,
        "gated_predicted_right": int((gated & predicted_right).sum()),
        "gated_predicted_wrong": int((gated & ~predicted_right).sum()),
        "gate_precision": float(gate_right.sum() / gated.sum()) if gated.any() else math.nan,
        "gate_recall": float(gate_right.sum() / zero_var.sum()) if zero_var.any() else math.nan,
        "zero_variance_problems": int(zero_var.sum()),
        "gate_skipped_samples": int(gated.sum()) * n,
        "gate_skipped_tokens": int(lengths[gated].sum()) if P else 0,
        "gate_skipped_token_fraction": float(lengths[gated].sum() / lengths.sum()) if P and lengths.sum() else math.nan,
    }
    per_problem = {"pred_pass": pred_pass, "pred_pass_std": pass_std, "n_parsed": n_valid, "true_pass": true_pass,
                   "pred_length": pred_len, "true_length": true_len, "gated": gated}
    return MetaReport(summary, per_problem)


def concat(reports: Sequence[MetaReport]) -> dict:
    """Per-problem arrays of several benchmarks, concatenated in order."""
    keys = reports[0].per_problem.keys() if reports else ()
    return {k: np.concatenate([r.per_problem[k] for r in reports]) for k in keys}


def write_figures(per_benchmark: dict[str, MetaReport], pooled: dict, prefix: str, title: str = "") -> list[str]:
    """`<prefix>calibration.png` (predicted vs actual pass rate, all problems and each benchmark: the paper's
    Figure 2) and `<prefix>length_calibration.png` (predicted vs actual correct-solution length). Returns the
    paths written (a figure without a single finite pair is skipped)."""
    panels = [("all problems", pooled)] + ([(name, r.per_problem) for name, r in per_benchmark.items()]
                                           if len(per_benchmark) > 1 else [])
    written = []
    for key_pred, key_true, name, kw in (
            ("pred_pass", "true_pass", "calibration.png", dict(lims=(0.0, 1.0))),
            ("pred_length", "true_length", "length_calibration.png",
             dict(lims=None, xlabel="predicted length (tokens)", ylabel="mean correct length (tokens)"))):
        use = [(t, d) for t, d in panels if np.any(np.isfinite(d[key_pred]) & np.isfinite(d[key_true]))]
        if not use:
            continue
        path = metrics_lib.plot_calibration([d[key_pred] for _, d in use], [d[key_true] for _, d in use],
                                            prefix + name, title, panel_titles=[t for t, _ in use], **kw)
        written.append(str(path))
    return written
