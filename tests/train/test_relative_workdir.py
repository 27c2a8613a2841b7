"""The README's first command as a user types it: the default, relative workdir (runs/<algorithm> under
the cwd). Orbax's OCDBT writer refuses relative checkpoint paths, so before run paths were made absolute
at the edge (fs.absolute) this crashed at the second checkpoint with rc 1 (issue 19.1)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from masa_jax import fs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_absolute_keeps_uris_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.absolute("runs/x") == os.path.join(str(tmp_path), "runs", "x")
    assert fs.absolute("gs://bucket/run1") == "gs://bucket/run1"
    assert fs.absolute("") == ""
    assert fs.absolute("~/r") == os.path.join(os.path.expanduser("~"), "r")


def _train(cwd, *extra, **popen):
    cmd = [sys.executable, "-m", "masa_jax.train", f"--config={ROOT}/configs/tiny.py", "--config.total_steps=3",
           "--config.checkpoint.every=1", "--config.eval.files=()", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.slow
def test_default_relative_workdir_checkpoints_resumes_and_survives_sigterm(tmp_path):
    run = tmp_path / "runs" / "masa_efficient"
    p = _train(tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert steps[-1] == 3 and len(steps) >= 2, steps

    # the same command again: a finished run restores and returns, training no step
    p = _train(tmp_path)
    out2, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out2[-3000:]
    assert len(open(run / "metrics.jsonl").read().splitlines()) == 3

    # SIGTERM mid-run in a new relative workdir, then resume to the end.
    p = _train(tmp_path, "--workdir=other", "--config.total_steps=6")
    deadline = time.time() + 600
    # Wait for a logged step: the writer creates metrics.jsonl during set-up, before the loop's SIGTERM
    # guard is installed (CI sent the signal then and the default handler killed the run, rc -15).
    metrics = tmp_path / "other" / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out3, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out3[-3000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "other" / "checkpoints") if d.isdigit())
    assert saved and saved[-1] < 6, saved
    p = _train(tmp_path, "--workdir=other", "--config.total_steps=6")
    out4, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out4[-3000:]
    lines = open(tmp_path / "other" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 6


@pytest.mark.slow  # a real (1-step, tiny) training run
def test_train_from_python_without_a_workdir_writes_only_its_own_run_directory(tiny_model_dir, small_config,
                                                                               tmp_path, monkeypatch, capsys):
    """`train.train(config, "")` (#19 item 6): everything lands in runs/<algorithm> under the cwd, whose
    absolute path is printed; nothing else appears in the cwd."""
    from masa_jax import train
    monkeypatch.chdir(tmp_path)
    config = small_config(tiny_model_dir, "grpo", total_steps=1)
    history = train.train(config, "")
    assert [h["step"] for h in history] == [1]
    assert sorted(os.listdir(tmp_path)) == ["runs"]
    run_dir = tmp_path / "runs" / "grpo"
    assert {"config.json", "metrics.jsonl", "checkpoints"} <= set(os.listdir(run_dir))
    assert f"run directory: {run_dir}" in capsys.readouterr().out
