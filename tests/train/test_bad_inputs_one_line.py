"""Bad inputs that ended in a traceback (issue #19 item 4) end in one line naming the file or field, exit
code 2, nothing left behind. Each case fails in the checks, before a model is built."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses of the CLIs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(REPO, "masa_jax", "toy", "assets", "base_model")
TINY = "--config=configs/tiny.py"


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr[-3000:])
    return lines[0]


def _edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update({k: (v(c[k]) if callable(v) else v) for k, v in changes.items()})
    (d / "config.json").write_text(json.dumps(c))


def _break(case, d):
    weights = d / "model.safetensors"
    if case == "truncated_safetensors":
        os.truncate(weights, weights.stat().st_size // 2)
    elif case == "garbage_header":
        data = weights.read_bytes()
        weights.write_bytes(struct.pack("<Q", 200) + b"{garbage" + b"x" * 192 + data[300:])
    elif case == "unparsable_config":
        (d / "config.json").write_text('{"hidden_size": 12,')
    elif case == "shape_mismatch":
        _edit_config(d, intermediate_size=lambda n: 2 * n)
    elif case == "layer_count_mismatch":
        _edit_config(d, num_hidden_layers=lambda n: n + 2)
    elif case == "missing_shard":
        weights.unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    elif case == "missing_tokenizer":
        (d / "tokenizer.json").unlink()
    return {"truncated_safetensors": "model.safetensors", "garbage_header": "model.safetensors",
            "unparsable_config": "config.json", "shape_mismatch": "model.layers.0.mlp.gate_proj.weight",
            "layer_count_mismatch": "model.layers.4", "missing_shard": "model-00001-of-00002.safetensors",
            "missing_tokenizer": "tokenizer"}[case]


@pytest.mark.parametrize("case", ["truncated_safetensors", "garbage_header", "unparsable_config", "shape_mismatch",
                                  "layer_count_mismatch", "missing_shard", "missing_tokenizer"])
def test_a_broken_model_dir_is_one_line(tmp_path, case):
    d = tmp_path / "model"
    shutil.copytree(BASE, d)
    named = _break(case, d)
    line = _one_line_error(_run("masa_jax.train", TINY, f"--config.model.path={d}", f"--workdir={tmp_path}/run"))
    assert str(d) in line and named in line, line
    assert not (tmp_path / "run").exists()


def test_a_mesh_that_does_not_divide_the_devices_is_one_line(tmp_path):
    line = _one_line_error(_run("masa_jax.train", TINY, "--config.mesh.shape=(2,-1,1)", f"--workdir={tmp_path}/run"))
    assert "config.mesh.shape" in line and "(2, -1, 1)" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workdir", ["/proc/masa_jax_run", "/sys/masa_jax_run"])
def test_an_unwritable_workdir_is_one_line(workdir):
    line = _one_line_error(_run("masa_jax.train", TINY, f"--workdir={workdir}"))
    assert workdir in line and "cannot be written" in line


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None, reason="the [tfds] extra is installed")
def test_tfds_without_the_extra_is_one_line(tmp_path):
    line = _one_line_error(_run("masa_jax.train", TINY, '--config.data.train_files=("tfds:gsm8k",)',
                                f"--workdir={tmp_path}/run"))
    assert "tfds:gsm8k" in line and "masa_jax[tfds]" in line


@pytest.mark.parametrize("flags,expected", [(["--k=abc"], "--k 'abc'"), (["--n=2", "--k=8"], "pass@8")])
def test_evaluate_refuses_bad_k(tmp_path, flags, expected):
    data = tmp_path / "b.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    line = _one_line_error(_run("masa_jax.evaluate", "--config=configs/eval_paper.py:tiny", f"--checkpoint={BASE}",
                                f"--data={data}", *flags))
    assert expected in line, line


def test_evaluate_on_an_hf_dir_never_writes_into_it():
    from masa_jax import evaluate
    assert evaluate.default_output(BASE) == os.path.join("runs", "eval", "base_model", "eval.json")
    assert evaluate.default_output("/runs/r1") == "/runs/r1/eval.json"


def test_every_checkpoint_unreadable_is_one_user_error(tmp_path):
    import jax.numpy as jnp
    from masa_jax import errors
    from masa_jax.checkpointing import RunCheckpointer
    with RunCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)}, {"step": 1}, force=True)
    with RunCheckpointer(tmp_path / "ckpt") as ckpt, pytest.raises(errors.UserError) as e:
        ckpt.restore_latest({"w": jnp.ones((4, 4))})  # another model's state
    assert "\n" not in str(e.value) and "could be restored" in str(e.value) and "--workdir" in str(e.value)
