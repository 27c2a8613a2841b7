"""experiments/bench_peer.py (masa_jax against Tunix, issue 23) runs end to end with --quick and its
cross-check passes: greedy tokens equal between masa_jax, Tunix and transformers, and the first GRPO
update's loss, gradient norm and old log-probs agree. The speed numbers are not asserted (benchmarks show
speed, never unit tests). Needs the bench extra (`pip install -e ".[bench]"`, in a venv of its own)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tunix") is None,
    reason="Tunix is not installed: the peer benchmark needs the bench extra (pip install -e '.[bench]', "
           "in its own venv since it moves transformers)")


@pytest.mark.slow
def test_quick_run_cross_check_passes(tmp_path):
    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_peer.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cross-check: PASS" in proc.stdout
    record = json.loads(out.read_text())
    assert record["cross_check_ok"]
    checks = record["checks"]
    for B in record["args"]["batches"]:
        c = checks[f"greedy_batch{B}"]
        assert c["masa_jax==tunix"] == c["masa_jax==transformers"] == c["rows"] == B
    # The update with every row its own prompt, and with groups of 2 sharing it (masa_jax: shared prefix).
    for key in ("update", "update_groups2"):
        update = checks[key]
        (ours, peer), (gn_ours, gn_peer) = update["loss"], update["grad_norm"]
        assert gn_ours > 0 and abs(gn_ours - gn_peer) <= 1e-4 * gn_peer  # a real gradient, the same on both sides
        assert abs(ours - peer) <= 1e-5 * max(1.0, abs(peer))
        assert update["old_logprob_max_abs_diff"] <= 1e-4
    assert "| masa_jax / Tunix (speed) |" in proc.stdout  # the table
