"""User errors of `python -m masa_jax.train` / `masa_jax.evaluate` end in one line on stderr naming the file
or field (exit code 2), leave nothing behind, and show the traceback only with --debug / MASA_JAX_DEBUG=1.
Every case here fails before a model is compiled, so each call costs about the import time."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from masa_jax.errors import UserError

pytestmark = pytest.mark.slow  # subprocesses of the CLIs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "--config=configs/tiny.py"


def _run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_line_error(res) -> str:
    """The single stderr line of a user error (exit code 2)."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr[-3000:])
    return lines[0]


def _files(path, text=None, data=None):
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text(text)
    return f'--config.data.train_files=("{path}",)'


def _parquet_bytes(tmp_path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    gt = [json.dumps({"question": f"{i}+1", "target": str(i + 1)}) for i in range(50)]
    pq.write_table(pa.table({"reward_model": [{"ground_truth": g} for g in gt]}), tmp_path / "full.parquet")
    return (tmp_path / "full.parquet").read_bytes()


@pytest.mark.parametrize("case", ["missing", "empty", "blank_lines", "truncated_jsonl", "truncated_parquet",
                                  "bad_utf8"])
def test_a_bad_data_file_is_one_line_naming_it_and_no_workdir_is_left(tmp_path, case):
    workdir = tmp_path / "run"
    path = tmp_path / ("train.parquet" if case == "truncated_parquet" else "train.jsonl")
    flag = {
        "missing": lambda: f'--config.data.train_files=("{path}",)',
        "empty": lambda: _files(path, ""),
        "blank_lines": lambda: _files(path, "\n\n  \n"),
        "truncated_jsonl": lambda: _files(path, '{"problem": "1+1", "answer": "2"}\n{"problem": "2+'),
        "truncated_parquet": lambda: _files(path, data=_parquet_bytes(tmp_path)[:300]),
        "bad_utf8": lambda: _files(path, data=b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff", "answer": 1}\n'),
    }[case]()
    line = _one_line_error(_run("masa_jax.train", TINY, flag, f"--workdir={workdir}"))
    assert str(path) in line
    if case == "bad_utf8":
        assert "UTF-8" in line and "row 1" in line
    if case == "truncated_jsonl":
        assert "row 1" in line
    assert not workdir.exists()


def test_a_missing_model_dir_is_one_line_naming_the_field(tmp_path):
    workdir = tmp_path / "run"
    line = _one_line_error(_run("masa_jax.train", TINY, f"--config.model.path={tmp_path}/nomodel",
                                f"--workdir={workdir}"))
    assert "config.model.path" in line and f"{tmp_path}/nomodel" in line
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _one_line_error(_run("masa_jax.train", TINY, f"--workdir={tmp_path}/afile"))
    assert f"{tmp_path}/afile" in line and "--workdir" in line


def test_an_unknown_config_field_is_one_line_naming_it():
    line = _one_line_error(_run("masa_jax.train", TINY, "--config.rl.lrr=2e-6", "--dry_run"))
    assert "config.rl.lrr" in line and '"lr"' in line


def test_a_missing_config_file_is_one_line():
    line = _one_line_error(_run("masa_jax.train", "--config=configs/nope.py", "--dry_run"))
    assert "configs/nope.py" in line


def test_dry_run_validates_the_config_first():
    line = _one_line_error(_run("masa_jax.train", "--config=configs/qwen8b.py", "--dry_run", "--config.algorithm=mas"))
    assert "config.algorithm" in line and "'mas'" in line


def test_invalid_values_are_rejected_on_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    line = _one_line_error(_run("masa_jax.train", TINY, "--config.rollout.temperature=0", f"--workdir={workdir}"))
    assert "config.rollout.temperature" in line
    line = _one_line_error(_run("masa_jax.train", TINY, "--config.checkpoint.every=0", f"--workdir={workdir}"))
    assert "config.checkpoint.every" in line
    assert not workdir.exists()


@pytest.mark.parametrize("how", [("--debug",), ()])
def test_debug_shows_the_traceback(tmp_path, how):
    env = None if how else {"MASA_JAX_DEBUG": "1"}
    res = _run("masa_jax.train", TINY, f"--config.model.path={tmp_path}/nomodel", f"--workdir={tmp_path}/run", *how,
               env=env)
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "config.model.path" in res.stderr.strip().splitlines()[-1]


def test_resuming_with_another_config_is_refused_with_a_diff(tmp_path):
    """The stored config.json says total_steps 99 and lr 1e-3; the command line's config differs in both."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import tiny
    from masa_jax import config as config_lib
    stored = json.loads(json.dumps(config_lib.resolve(tiny.get_config()).to_dict(), default=str))
    stored["total_steps"], stored["rl"]["lr"] = 99, 1e-3
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(stored, indent=2))
    before = (workdir / "config.json").read_text()
    line = _one_line_error(_run("masa_jax.train", TINY, f"--workdir={workdir}"))
    assert "total_steps: 99 -> 30" in line and "rl.lr: 0.001 -> 0.0003" in line
    assert "--allow_config_change" in line
    assert (workdir / "config.json").read_text() == before and os.listdir(workdir) == ["config.json"]


def test_evaluate_on_a_missing_checkpoint_creates_nothing(tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    missing = tmp_path / "MISSING"
    line = _one_line_error(_run("masa_jax.evaluate", TINY, f"--checkpoint={missing}", f"--data={data}"))
    assert str(missing) in line
    assert not missing.exists()


def test_evaluate_on_a_missing_data_file_is_one_line(tmp_path):
    line = _one_line_error(_run("masa_jax.evaluate", TINY, f"--checkpoint={tmp_path}",
                                f"--data={tmp_path}/nope.jsonl"))
    assert f"{tmp_path}/nope.jsonl" in line


def test_a_start_that_fails_after_the_checks_removes_the_dirs_it_created(tiny_model_dir, small_config, tmp_path):
    """Truncated weights are refused by the checks now (#19 item 4), before the workdir is made."""
    from masa_jax import train
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(16)
    with pytest.raises(UserError, match="corrupt safetensors header"):
        train.train(small_config(str(model), "grpo", total_steps=1), str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()
    (model / "model.safetensors").unlink()  # no weights at all: a user error before anything is made
    with pytest.raises(UserError, match="config.model.path .* has no config.json or model.safetensors"):
        train.train(small_config(str(model), "grpo", total_steps=1), str(tmp_path / "new" / "run"))
