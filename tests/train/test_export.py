"""`python -m masa_jax.export`: a training run's newest checkpoint as an HF directory. The written weights
are the policy `evaluation.policy.load_policy` restores (full fine-tuning; a LoRA run merged, plus
PEFT's adapter layout); the directory holds what transformers needs; bad arguments are one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from masa_jax import config as config_lib, export, train
from masa_jax.evaluation import policy
from masa_jax.models import qwen

pytestmark = pytest.mark.slow  # real (1-step) training runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "masa_jax.export", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def _assert_same_params(got, want):
    for (path, x), y in zip(jax.tree.flatten_with_path(jax.device_get(got))[0], jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_the_cli_exports_a_run_as_the_policy_load_policy_restores(tiny_model_dir, small_config, tmp_path):
    config = small_config(tiny_model_dir, "grpo", total_steps=1, **{"rl.lr": 1e-2})
    run = str(tmp_path / "run")
    train.train(config, run)
    out = tmp_path / "hf"
    proc = _cli(f"--checkpoint={run}", f"--output={out}", "--dtype=float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    _, trained, _ = policy.load_policy(config_lib.resolve(config), run)
    _, exported = qwen.from_pretrained(str(out))
    _assert_same_params(exported, trained)
    _, base = qwen.from_pretrained(tiny_model_dir)
    assert np.abs(np.asarray(exported["layers"]["q_proj"]) - np.asarray(base["layers"]["q_proj"])).max() > 0

    # one-line errors, exit 2: the output exists, the checkpoint is already an HF directory, a bad dtype
    for args, message in (([f"--checkpoint={run}", f"--output={out}"], "exists and is not empty"),
                          ([f"--checkpoint={out}", f"--output={tmp_path / 'x'}"], "is already an HF model directory"),
                          ([f"--checkpoint={run}", f"--output={tmp_path / 'y'}", "--dtype=int8"], "--dtype must be")):
        proc = _cli(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_a_lora_run_exports_merged_weights_and_the_peft_adapter(tiny_model_dir, small_config, tmp_path):
    config = small_config(tiny_model_dir, "masa", total_steps=1, **{"lora.rank": 4, "lora.alpha": 8.0,
                                                                  "rl.lr": 1e-2})
    run = str(tmp_path / "run")
    train.train(config, run)
    resolved = config_lib.resolve(config)
    out = export.export(resolved, run, str(tmp_path / "hf"), dtype="float32")
    _, merged, _ = policy.load_policy(resolved, run)
    _, exported = qwen.from_pretrained(out)
    for (path, x), y in zip(jax.tree.flatten_with_path(jax.device_get(exported))[0], jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, err_msg=jax.tree_util.keystr(path))
    adapter = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and adapter["base_model_name_or_path"] == tiny_model_dir
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
