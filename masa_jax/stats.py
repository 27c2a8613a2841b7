"""Small statistics shared by the rollout, the evaluation and the logs: Pearson r and unbiased pass@k.

NumPy only, so the RL step can use them without importing the logging / plotting stack.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of paired samples; NaN when it is undefined.

    Pairs where either value is missing or non-finite (None / NaN, e.g. an unparseable meta
    prediction) are dropped. Undefined — fewer than two pairs, or either side constant — gives NaN,
    not 0: "no linear relation can be measured" is not "uncorrelated", and a 0 would bias averages
    over steps. NaN is logged as null by ``MetricsWriter`` and skipped by the plots.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson needs paired samples, got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    # ptp == 0 tests constancy exactly; a variance test would mistake rounding noise for signal.
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    r = float(np.dot(dx, dy) / math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy))))
    return min(1.0, max(-1.0, r))


def pass_at_k(n: Any, c: Any, k: Any) -> Any:
    """Unbiased pass@k estimator 1 − C(n−c, k) / C(n, k), elementwise over broadcast arrays.

    n: samples drawn per problem, c: how many of them are correct, k: the k of pass@k (k <= n).
    Computed as 1 − prod_{j<k} (1 − c / (n − j)) — the same ratio term by term — which never forms
    the huge binomials (n = 1024 would overflow float64). Returns a float for scalar inputs,
    otherwise a float64 array of the broadcast shape.
    """
    n, c, k = np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in (n, c, k)))
    if np.any(k < 1) or np.any(k > n) or np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k needs 1 <= k <= n and 0 <= c <= n")
    j = np.arange(int(k.max()) if k.size else 0)
    active = j < k[..., None]
    # Where j >= k the factor is 1; the guard keeps n - j positive there too (no division warnings).
    denom = np.where(active, n[..., None] - j, 1)
    factors = np.where(active, 1.0 - c[..., None] / denom, 1.0)
    # A zero factor (at j = n - c, when n - c < k) makes the product exactly 0, i.e. pass@k = 1.
    result = 1.0 - np.prod(factors, axis=-1)
    return float(result) if result.ndim == 0 else result
