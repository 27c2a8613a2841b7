"""config.lora: rank 0 is off, bad rank / alpha / target names are one-line UserErrors that list the valid
values, and a valid section becomes the LoraConfig the trainer builds its adapters from."""
import subprocess
import sys
import os

import pytest

from masa_jax import components
from masa_jax import config as config_lib
from masa_jax.errors import UserError
from masa_jax.models.qwen.lora import TARGETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    c = config_lib.base_config()
    c.model.path = "/m"
    return config_lib.override(c, overrides)


@pytest.mark.parametrize("field,value,message", [
    ("lora.rank", -1, r"config\.lora\.rank must be an integer >= 0 \(0: no LoRA, full fine-tuning\), got -1"),
    ("lora.alpha", 0.0, r"config\.lora\.alpha must be a finite number > 0 \(the scale is alpha / rank\), got 0\.0"),
    ("lora.alpha", float("nan"), r"config\.lora\.alpha must be a finite number > 0"),
    ("lora.targets", ("q_proj", "qkv"), r"config\.lora\.targets must be distinct names from \['q_proj', 'k_proj', "
                                        r"'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'\], got \['q_proj', "
                                        r"'qkv'\] \(unknown: \['qkv'\]\)"),
    ("lora.targets", (), r"config\.lora\.targets must be distinct names"),
    ("lora.targets", ("q_proj", "q_proj"), r"config\.lora\.targets must be distinct names"),
    ("lora.base_quantization", "int3", r"config\.lora\.base_quantization must be one of \['', 'int8', 'int4', "
                                       r"'nf4'\], got 'int3'"),
])
def test_bad_lora_values_are_one_line_errors_with_the_valid_values(field, value, message):
    with pytest.raises(UserError, match=message) as e:
        config_lib.resolve(_config(**{"lora.rank": 8, field: value}))
    assert "\n" not in str(e.value)


def test_rank_zero_is_full_fine_tuning_and_a_valid_section_is_the_lora_config():
    assert components.lora_config(config_lib.resolve(_config())) is None
    # rank 0 ignores the other fields (they are not read)
    assert components.lora_config(config_lib.resolve(_config(**{"lora.targets": ("nope",)}))) is None
    lc = components.lora_config(config_lib.resolve(_config(**{"lora.rank": 16, "lora.alpha": 32,
                                                              "lora.targets": ("q_proj", "v_proj")})))
    assert (lc.rank, lc.alpha, lc.targets, lc.scale) == (16, 32.0, ("q_proj", "v_proj"), 2.0)
    assert tuple(config_lib.base_config().lora.targets) == TARGETS


def test_base_quantization_needs_lora_and_reaches_the_lora_config():
    with pytest.raises(UserError, match=r"config\.lora\.base_quantization='int8' needs LoRA \(config\.lora\.rank "
                                        r">= 1\)"):
        config_lib.resolve(_config(**{"lora.base_quantization": "int8"}))
    lc = components.lora_config(config_lib.resolve(_config(**{"lora.rank": 8, "lora.base_quantization": "nf4"})))
    assert lc.base_quantization == "nf4"
    assert components.lora_config(config_lib.resolve(_config(**{"lora.rank": 8}))).base_quantization == ""


def test_a_bad_target_on_the_command_line_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/tiny.py", "--config.lora.rank=4",
                          "--config.lora.targets=('q_proj','attn')", f"--workdir={tmp_path / 'w'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.lora.targets" in lines[0] and "'gate_proj'" in lines[0], out.stderr
    assert not (tmp_path / "w").exists()


def _qwen8b(**overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location("qwen8b", os.path.join(REPO, "configs", "qwen8b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(config_lib.override(module.get_config(), overrides))


def test_dry_run_counts_the_adapters_as_the_only_trainable_params():
    from masa_jax import dry_run

    full = dry_run.estimate(_qwen8b())
    lo = dry_run.estimate(_qwen8b(**{"lora.rank": 16}))
    # Qwen3-8B: 36 layers, hidden 4096, 32 x 128 q heads, 8 x 128 kv heads, ffn 12288; (in + out) x rank each
    per_layer = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 12288))
    assert lo["num_adapter_params"] == 36 * per_layer == 43_646_976
    mesh_shards = 8 * 4  # q / o / mlp adapters split over fsdp on one side and tensor on the other at most
    assert 4 * lo["num_adapter_params"] / mesh_shards <= lo["lora_adapters"] <= 4 * lo["num_adapter_params"]
    # float32 gradients of the adapters, and as many again for the micro-batch accumulator (the 8B config
    # accumulates micro-batches of 16 over a mini-batch)
    assert lo["grads"] == 2 * lo["lora_adapters"] and lo["optimizer"] == 2 * lo["lora_adapters"]
    assert lo["params"] == full["params"] + lo["lora_adapters"]  # the frozen base stays
    assert full["grads"] == 2 * full["params"] and full["optimizer"] == 2 * full["params"]
    assert lo["train_total"] < full["train_total"] - 2.5 * 1024 ** 3
    report = dry_run.report(_qwen8b(**{"lora.rank": 16}))
    assert "LoRA rank 16, alpha 16 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: 43.65 M" in report
    assert "lora_adapters" in report


def test_dry_run_counts_a_quantized_base_in_its_bits():
    from masa_jax import dry_run

    one = {"lora.rank": 16, "model.param_dtype": "bfloat16", "mesh.shape": (1, 1, 1)}  # one device: whole arrays
    dense = dry_run.estimate(_qwen8b(**one))
    q8 = dry_run.estimate(_qwen8b(**one, **{"lora.base_quantization": "int8"}))
    q4 = dry_run.estimate(_qwen8b(**one, **{"lora.base_quantization": "int4"}))
    # Qwen3-8B's projections: 36 layers x (4096 x (4096 + 2 x 1024) + 4096 x 4096 + 3 x 4096 x 12288) weights
    proj = 36 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288)
    assert proj == 6_945_767_424
    # int8: 1 byte instead of 2 per weight, plus bfloat16 scales per (layer, output channel)
    scales8 = 2 * 36 * (4096 + 2 * 1024 + 4096 + 2 * 12288 + 4096)
    assert dense["params"] - q8["params"] == proj - scales8
    # int4: half a byte, plus a scale per 64 input features (o_proj: per head, its head_dim 128 = 2 blocks)
    scales4 = 2 * 36 * (4096 // 64 * (4096 + 2 * 1024) + 32 * 2 * 4096 + 4096 // 64 * 2 * 12288 + 12288 // 64 * 4096)
    assert dense["params"] - q4["params"] == proj * 3 // 2 - scales4
    assert q4["sampling_params"] < q8["sampling_params"] < dense["sampling_params"]
    report = dry_run.report(_qwen8b(**one, **{"lora.base_quantization": "int4"}))
    assert "frozen base: int4 projection weights (qwix" in report
