"""masa_jax.stats against numpy and hand-computed values."""
import math
from fractions import Fraction

import numpy as np
import pytest

from masa_jax.stats import pass_at_k, pearson


def test_pearson_matches_numpy_and_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([0.1] * 5, [0.0, 0.2, 0.4, 0.6, 1.0]))  # constant predictions
    assert math.isnan(pearson([1.0], [2.0]))
    # None / NaN pairs (unparseable predictions) are dropped, not propagated.
    assert pearson([1, None, 2, 3, np.nan], [1, 5, 2, 3, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_pass_at_k_hand_values():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert isinstance(pass_at_k(4, 2, 2), float)
    for bad in ((4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_vectorised_matches_math_comb():
    n, c, k = zip(*[(n, c, k) for n in range(1, 13) for c in range(n + 1) for k in range(1, n + 1)])
    got = pass_at_k(np.array(n), np.array(c), np.array(k))
    want = [1 - math.comb(n_ - c_, k_) / math.comb(n_, k_) for n_, c_, k_ in zip(n, c, k)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # Broadcasting: pass@{1, 8, 32} for a batch of problems with 64 samples each.
    correct = np.array([0, 1, 7, 40, 64])
    table = pass_at_k(64, correct[:, None], np.array([1, 8, 32]))
    assert table.shape == (5, 3)
    np.testing.assert_allclose(table[:, 0], correct / 64)
    # Large n, where C(n, k) overflows float64: still exact to rounding.
    exact = 1 - Fraction(math.comb(1024 - 3, 200), math.comb(1024, 200))
    assert pass_at_k(1024, 3, 200) == pytest.approx(float(exact), rel=1e-12)


# ---------------------------------------------------------------------------------- figures
