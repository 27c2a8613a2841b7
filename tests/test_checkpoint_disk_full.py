"""A checkpoint write that meets a full disk: one line on stderr, the previous step intact.

Orbax's background save threads log each failure with ``logging.exception`` (a traceback per
thread, 4-87 blocks for one failed save, measured) before the error reaches ``RunCheckpointer``,
which turns it into one ``CheckpointWriteError`` line. Needs a small tmpfs: root only (CI, Colab
and TPU VMs run as root); skipped elsewhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from absl import logging as absl_logging
    absl_logging.use_absl_handler()          # as under absl.app.run (train.py)
    absl_logging.set_verbosity(absl_logging.INFO)
    from masa_jax import checkpointing

    ckpt = checkpointing.RunCheckpointer(sys.argv[1], max_to_keep=3)
    ckpt.save(1, {"w": np.ones((1000,), np.float32)}, {"step": 1}, force=True)   # 4 KB: fits
    ckpt.wait()
    try:
        ckpt.save(2, {"w": np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)}, {"step": 2}, force=True)  # 16 MB, incompressible: does not
        ckpt.wait()
    except checkpointing.CheckpointWriteError as err:
        print("ERROR:", err, file=sys.stderr)
        ckpt.close()
        print("STEPS:", ckpt.all_steps())
        sys.exit(2)
    sys.exit(0)
""")


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_keeps_the_previous_step(small_tmpfs):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(small_tmpfs / "ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "step 2" in errors[0] and "no space left on device" in errors[0]
    assert "newest complete checkpoint is step 1" in errors[0]
    assert "STEPS: [1]" in proc.stdout
    # Orbax's own error records (absl prefix "E<date>") for this failure are not printed either.
    import re
    assert not [line for line in proc.stderr.splitlines() if re.match(r"E\d{4} ", line)]
