"""MASA-efficient controls: turn meta predictions into gating, cutoff budgets and notion hints.

All decisions are host-side NumPy over `[P, M]` predictions (parsed `MetaPrediction`s); they feed the
sampler (which problems get solution rollouts, per-sequence budgets) and the solution prompts (hints).
A prediction whose field failed to parse is simply left out of that field's statistics.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    gate_std: float = 0.1          # predicted pass rates must agree this well (std of fractions) ...
    gate_tol: float = 0.0          # ... and have mean <= tol or >= 1 - tol to be gated
    gate_min_valid: int = 2        # fewer parsed pass rates than this: never gate (no evidence)
    cutoff_factor: float = 2.0     # budget = ceil(factor * mean predicted length)
    max_hint_notions: int = 5      # most frequent predicted notions named in the hint


@dataclasses.dataclass(frozen=True)
class Controls:
    """Per-problem decisions. gated bool[P]; budgets int[P] (max new tokens of each solution rollout);
    hints: P tuples of notion strings (empty = no hint); mean predicted pass rate / length (nan if none)."""
    gated: np.ndarray
    budgets: np.ndarray
    hints: tuple[tuple[str, ...], ...]
    pred_pass_mean: np.ndarray
    pred_length_mean: np.ndarray


def _field_matrix(preds: Sequence[Sequence], name: str) -> np.ndarray:
    """float [P, M] of one numeric field, nan where it did not parse."""
    return np.array([[np.nan if getattr(p, name) is None else float(getattr(p, name)) for p in row]
                     for row in preds], dtype=np.float64).reshape(len(preds), -1)


def predicted_stats(preds: Sequence[Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pass mean [P], pass std [P], number of parsed pass rates [P], length mean [P]); nan if none."""
    rates = _field_matrix(preds, "pass_rate")
    lengths = _field_matrix(preds, "length")
    valid = np.isfinite(rates).sum(axis=1)
    with warnings.catch_warnings():  # all-nan rows (nothing parsed) are expected: they give nan
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rates, axis=1)
        std = np.nanstd(rates, axis=1)  # population std over the parsed predictions
        length_mean = np.nanmean(lengths, axis=1)
    return mean, std, valid, length_mean


def gate_mask(pass_mean: np.ndarray, pass_std: np.ndarray, n_valid: np.ndarray, cfg: ControlConfig) -> np.ndarray:
    """bool [P]: problems predicted zero-variance (all wrong or all right) whose solution rollouts are
    skipped: the predictions agree (std < gate_std) on an extreme (mean <= tol or >= 1 - tol)."""
    extreme = (pass_mean <= cfg.gate_tol) | (pass_mean >= 1.0 - cfg.gate_tol)
    return (n_valid >= cfg.gate_min_valid) & (pass_std < cfg.gate_std) & extreme


def cutoff_budgets(length_mean: np.ndarray, max_new_tokens: int, cfg: ControlConfig) -> np.ndarray:
    """int [P]: ceil(cutoff_factor x mean predicted length), capped by the global max; the global max
    where no length parsed."""
    budgets = np.full(length_mean.shape, max_new_tokens, dtype=np.int64)
    ok = np.isfinite(length_mean)
    budgets[ok] = np.minimum(np.ceil(cfg.cutoff_factor * length_mean[ok]), max_new_tokens).astype(np.int64)
    return np.maximum(budgets, 1)


def hint_notions(preds_row: Sequence, max_notions: int) -> tuple[str, ...]:
    """The most frequent predicted notions of one problem (ties by first appearance)."""
    counts: Counter = Counter()
    for p in preds_row:
        for n in dict.fromkeys(n.strip() for n in (p.notions or ()) if n and n.strip()):
            counts[n] += 1
    return tuple(n for n, _ in counts.most_common(max_notions))


def compute_controls(preds: Sequence[Sequence], max_new_tokens: int, cfg: ControlConfig,
                     use_gating: bool = True, use_cutoff: bool = True, use_hints: bool = True) -> Controls:
    """All MASA-efficient decisions for a batch of P problems from their [P][M] meta predictions."""
    mean, std, valid, length_mean = predicted_stats(preds)
    P = len(preds)
    gated = gate_mask(mean, std, valid, cfg) if use_gating else np.zeros(P, bool)
    budgets = cutoff_budgets(length_mean, max_new_tokens, cfg) if use_cutoff else np.full(P, max_new_tokens)
    hints = tuple(hint_notions(row, cfg.max_hint_notions) if use_hints else () for row in preds)
    return Controls(gated=gated, budgets=budgets.astype(np.int64), hints=hints, pred_pass_mean=mean,
                    pred_length_mean=length_mean)


def control_metrics(controls: Controls, correct: np.ndarray, lengths: np.ndarray, finish_budget: np.ndarray,
                    max_new_tokens: int, applied: bool) -> dict[str, float]:
    """Gating / cutoff rates and their precision against what the solution rollouts actually did.

    correct bool [P, G], lengths int [P, G], finish_budget bool [P, G] (stopped by the cutoff budget);
    rows of gated problems are ignored when `applied` (they were not rolled out). When the controls were
    only *evaluated* (MASA phase, `applied=False`), precision compares the would-be decisions with the
    full rollouts: a would-be gate is right if the group really had zero variance in the predicted
    direction; a would-be cutoff is right if the rollout it would have cut was incorrect anyway.
    """
    gated = controls.gated
    P = len(gated)
    out = {"gate/fraction" if applied else "gate/would_gate_fraction": float(gated.mean()) if P else 0.0}
    rolled = ~gated if applied else np.ones(P, bool)
    if not applied and gated.any():
        acc = correct[gated].mean(axis=1)
        predicted_high = controls.pred_pass_mean[gated] >= 0.5
        right = np.where(predicted_high, acc == 1.0, acc == 0.0)
        out["gate/would_gate_precision"] = float(right.mean())
    budgets = controls.budgets[:, None] * np.ones_like(lengths)
    if applied:
        cut = finish_budget & rolled[:, None] & (budgets < max_new_tokens)
        n = int(rolled.sum()) * lengths.shape[1]
        out["cutoff/fraction"] = float(cut.sum() / n) if n else 0.0
        # Upper bound: a cut rollout could have run on to the global max.
        out["cutoff/tokens_saved_max"] = float(np.sum((max_new_tokens - budgets)[cut]))
    else:
        would_cut = lengths > budgets
        out["cutoff/would_cut_fraction"] = float(would_cut.mean()) if would_cut.size else 0.0
        if would_cut.any():
            out["cutoff/would_cut_precision"] = float((~correct[would_cut]).mean())
        out["cutoff/would_save_tokens"] = float(np.sum(np.maximum(lengths - budgets, 0)))
    return out

