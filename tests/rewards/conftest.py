"""Fixtures of the rewards tests: the copied MATH test solutions (the tests never read ../shared).

``tests/data/math_test_solutions.jsonl.gz``: for each of the 5,000 rows of the MATH test split
(Hendrycks et al., 2021; MIT license) in ``../shared/data/math/test.parquet``, the row index and
``reward_model.ground_truth.solution`` / ``.target`` (targets as restored there, see its README).
"""
import gzip
import json
import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "math_test_solutions.jsonl.gz"


@pytest.fixture(scope="session")
def math_rows() -> list[dict]:
    """The 5,000 MATH test rows {"row", "solution", "target"} (targets restored per the data README)."""
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def perturb():
    """perturb(targets, canonical) -> for row i, the target of the next row whose target differs from
    row i's after ``canonical``, so a perturbed pair is never trivially the same answer."""

    def _perturb(targets, canonical):
        n = len(targets)
        out = []
        for i, t in enumerate(targets):
            j = (i + 1) % n
            while canonical(targets[j]) == canonical(t):
                j = (j + 1) % n
            out.append(targets[j])
        return out

    return _perturb
