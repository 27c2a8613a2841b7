"""A LoRA training run end to end (config.lora.rank > 0): checkpoints hold the adapters only (plus the base
path in the extras), an interrupted run resumes bit-exactly, and `evaluation.policy.load_policy` / the lm-eval
backend load the run as base + merged adapters."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from masa_jax import train

pytestmark = pytest.mark.slow  # end to end: real training runs


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(train.TIMING_PREFIXES)}


def _lora_config(small_config, model_dir, algorithm="masa", total_steps=3):
    # masa: the RL step and the BC step both train the adapters
    return small_config(model_dir, algorithm, total_steps=total_steps,
                        **{"lora.rank": 4, "lora.alpha": 8.0, "rl.lr": 1e-2})


def test_lora_run_checkpoints_adapters_only_and_resumes_bit_exactly(tiny_model_dir, small_config, tmp_path):
    config = _lora_config(small_config, tiny_model_dir)
    full = train.train(config, str(tmp_path / "full"))
    part = train.train(config, str(tmp_path / "split"), stop_after=1)
    assert len(part) == 1
    resumed = train.train(config, str(tmp_path / "split"))
    assert [h["step"] for h in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert _comparable(a) == _comparable(b)
    assert any(h.get("bc/experts", 0) > 0 for h in full)  # the BC step ran on the adapters too

    step_dir = tmp_path / "split" / "checkpoints" / "3"
    tree = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
    keys = [eval(k) for k in tree]  # noqa: S307  (orbax writes the key paths as Python tuples)
    params_keys = {k[1:] for k in keys if k[0] == "params"}
    assert params_keys == {("layers", name, f) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj") for f in ("a", "b")}
    # the frozen base is not written
    assert {k[0] for k in keys} == {"step", "params", "opt_state", "num_skipped", "ref_params"}
    extras = json.loads((step_dir / "extras" / "metadata").read_text())  # orbax's JsonSave file
    assert extras["lora"] == {"base_model": tiny_model_dir, "rank": 4, "alpha": 8.0,
                              "targets": list(config.lora.targets), "base_quantization": ""}


def test_evaluate_and_the_lm_eval_backend_load_a_lora_run_merged(tiny_model_dir, small_config, tmp_path):
    import orbax.checkpoint as ocp

    from masa_jax import config as config_lib
    from masa_jax.evaluation import policy
    from masa_jax.evaluation import lm_eval_backend
    from masa_jax.models import qwen
    from masa_jax.models.qwen import lora

    config = _lora_config(small_config, tiny_model_dir, total_steps=2)  # masa: BC moves B
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    resolved = config_lib.resolve(config)
    model_cfg, merged, _ = policy.load_policy(resolved, workdir)

    # By hand: the adapters of the newest checkpoint, merged into the base weights read from model.path.
    _, base = qwen.from_pretrained(tiny_model_dir)
    raw = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    adapters = jax.tree.map(np.asarray, raw["params"])
    assert np.abs(adapters["layers"]["q_proj"]["b"]).max() > 0  # trained away from B = 0
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    want = jax.device_get(lora.merge(jax.device_get(base), adapters, lcfg))
    for (path, x), y in zip(jax.tree.flatten_with_path(jax.device_get(merged))[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(merged["layers"]["q_proj"]) - np.asarray(base["layers"]["q_proj"])).max() > 0

    loaded = lm_eval_backend.load_model(checkpoint=workdir)  # the run's own config.json names the base
    for x, y in zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert loaded.model_cfg == model_cfg


def test_a_qlora_run_on_an_int8_base_resumes_bit_exactly_and_loads_as_the_dequantized_merge(
        tiny_model_dir, small_config, tmp_path):
    import orbax.checkpoint as ocp

    from masa_jax import config as config_lib
    from masa_jax.evaluation import policy
    from masa_jax.models import qwen
    from masa_jax.models.qwen import lora, quantize

    config = small_config(tiny_model_dir, "masa", total_steps=2, **{"lora.rank": 4, "lora.alpha": 8.0, "rl.lr": 1e-2,
                                                                  "lora.base_quantization": "int8"})
    full = train.train(config, str(tmp_path / "full"))
    assert len(train.train(config, str(tmp_path / "split"), stop_after=1)) == 1
    resumed = train.train(config, str(tmp_path / "split"))  # rebuilds the same int8 base from model.path
    assert [_comparable(a) for a in full] == [_comparable(b) for b in resumed]
    step_dir = tmp_path / "split" / "checkpoints" / "2"
    assert json.loads((step_dir / "extras" / "metadata").read_text())["lora"]["base_quantization"] == "int8"

    # evaluate / lm-eval / the export read the policy trained: the int8 base dequantized, adapters merged
    _, merged, _ = policy.load_policy(config_lib.resolve(config), str(tmp_path / "split"))
    _, base = qwen.from_pretrained(tiny_model_dir)
    raw = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    adapters = jax.tree.map(np.asarray, raw["params"])
    assert np.abs(adapters["layers"]["q_proj"]["b"]).max() > 0
    want = jax.device_get(lora.merge(quantize.quantize_base(base, "int8"), adapters,
                                     lora.LoraConfig(rank=4, alpha=8.0, base_quantization="int8")))
    for (path, x), y in zip(jax.tree.flatten_with_path(jax.device_get(merged))[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    dense_merge = jax.device_get(lora.merge(jax.device_get(base), adapters, lora.LoraConfig(rank=4, alpha=8.0)))
    assert np.abs(np.asarray(merged["layers"]["q_proj"]) - dense_merge["layers"]["q_proj"]).max() > 0  # int8 shows
