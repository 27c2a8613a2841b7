"""generate() on a 4-device CPU mesh (fsdp 2 x tensor 2) after resharding training params into the
sampling layout equals the single-device result. Runs sharded_generate_check.py in a subprocess because
the fake devices need XLA_FLAGS before jax starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharded_generate_check.py")


@pytest.mark.slow
def test_sharded_generate_matches_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert r["device_count"] == 4
    # Training: embed dim over fsdp, heads over tensor; sampling: replicated over fsdp, heads over tensor.
    assert r["train_q_spec"] == [None, "fsdp", "tensor", None]
    assert r["sampling_q_spec"] == [None, "tensor", None]
    assert r["sampling_embed_spec"] == ["tensor", None]
    assert r["sampling_dtype"] == "float32"
    assert r["greedy_equal"] and r["reasons_equal"]
    assert r["max_logprob_diff"] < 1e-4
    assert r["reshard"]["seconds"] > 0 and r["reshard"]["param_bytes_out"] == r["reshard"]["param_bytes_in"]
