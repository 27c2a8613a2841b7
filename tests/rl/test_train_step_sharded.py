"""The sharded step on 8 fake CPU devices equals the 1-device step, keeps params / optimizer state /
reference params sharded as configured, and compiles once; so does the shared-prefix layout. Runs sharded_step_main.py in a subprocess
because the device count must be fixed before jax is imported."""
import json
import os
import pathlib
import subprocess
import sys
import pytest


pytestmark = pytest.mark.slow  # subprocess with 8 CPU devices


def test_sharded_step_matches_single_device():
    script = pathlib.Path(__file__).with_name("sharded_step_main.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])

    assert r["devices"] == 8
    assert r["moved"] > 1e-3                        # two real updates happened...
    assert r["grad_err"] <= 1e-5, r                 # ...from the same gradient...
    assert r["param_err"] <= 1e-5, r                # ...to the same params and Adam state
    assert r["opt_err"] <= 1e-5, r
    assert r["ref_err"] == 0.0                      # the reference policy is frozen
    assert r["metrics_differing"] == [] and r["num_metrics"] >= 15, r  # old-log-prob and step metrics
    assert r["kl_loss"][0] < 1e-9 < r["kl_loss"][1]  # KL 0 before the first update, then positive
    assert abs(r["entropy_pair"][0] - r["entropy_pair"][1]) <= 1e-5 * r["entropy_pair"][0]
    assert r["entropy_pair"][0] > 1.0
    assert r["skipped"] == [0.0] * 4 and r["steps"] == [2, 2]

    # Params, Adam moments and reference sharded as the rules say: q_proj [L, D, H, hd] with D over
    # fsdp and heads over tensor; every leaf of the state has exactly its configured sharding.
    assert r["shardings_as_configured"]
    assert r["q_proj_spec"] == r["q_proj_mu_spec"] == r["ref_q_proj_spec"] == "P(None, 'fsdp', 'tensor', None)"
    assert r["embed_spec"] == "P('tensor', 'fsdp')"
    L, D, H, hd = r["q_proj_shape"]
    assert r["q_proj_shard_shape"] == [L, D // 2, H // 2, hd]

    # compute_logprobs and the RL step each compiled once for their fixed shapes.
    assert r["compiles_1"] == [1, 1] and r["compiles_8"] == [1, 1]

    # The shared-prefix layout sharded over the 4 data-parallel devices (8 blocks of 2 rows, 1 prompt
    # each) gives the 1-device row layout's two updates.
    assert r["shared_blocks"] == [8, 2, 1]
    assert r["shared_grad_err"] <= 1e-5 and r["shared_param_err"] <= 1e-5, r
    assert r["shared_metrics_differing"] == [], r
    assert r["shared_shardings_as_configured"] and r["shared_compiles_8"] == [1, 1]
