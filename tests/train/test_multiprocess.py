"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) train 2 steps together and
agree on the params: the multi-controller code path of a TPU pod."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest


pytestmark = pytest.mark.slow  # two JAX processes

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree_on_params(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), tiny_model_dir, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900)[0])
        finally:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    d0 = np.load(tmp_path / "params_digest_0.npy")
    d1 = np.load(tmp_path / "params_digest_1.npy")
    np.testing.assert_array_equal(d0, d1)
    assert "step 2" in outs[0] and "step 2" in outs[1]
