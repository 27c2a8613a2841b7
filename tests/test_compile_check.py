"""`--dry_run` asks XLA (issue 22): the programs of one training step compiled for a TPU slice on a CPU
host, through libtpu's compile-only client. The XLA tests need the [tpu] extra (libtpu); CI runs this
file in a venv of its own with it (.ci/run). The rest runs everywhere."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

from masa_jax import compile_check, config as config_lib
from masa_jax.errors import UserError
from masa_jax.models.qwen import attention
from masa_jax.models.qwen.presets import preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if compile_check.libtpu_missing() is None:
    # Where libtpu is (CI's tpu venv runs this file alone), no persistent cache: an earlier session's
    # compile-only entries would be read back (conftest sets a cache dir). check() itself writes none.
    jax.config.update("jax_enable_compilation_cache", False)
needs_libtpu = pytest.mark.skipif(compile_check.libtpu_missing() is not None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]' (CI: .ci/run's tpu venv)")
# The toy model at short lengths: every program compiles in seconds.
SMALL = {"mesh.topology": "v5e-4", "data.max_prompt_length": 64, "rollout.max_response_length": 64,
         "rollout.meta_max_new_tokens": 32, "rollout.num_slots": 16, "rl.micro_batch_size": 8,
         "bc.buffer_size": 8}


def _config(name: str, overrides: dict):
    spec = importlib.util.spec_from_file_location(f"{name}_cfg", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(config_lib.override(module.get_config(), overrides))


def _tiny(**overrides):
    return _config("tiny", {**SMALL, **overrides})


def _colab(**overrides):
    return _config("qwen3_0p6b_colab", overrides)


def test_libtpu_is_there_where_ci_requires_it():
    """.ci/run's tpu venv sets MASA_JAX_REQUIRE_LIBTPU=1: there the XLA tests must run, not skip."""
    if os.environ.get("MASA_JAX_REQUIRE_LIBTPU") == "1":
        assert compile_check.libtpu_missing() is None, compile_check.libtpu_missing()


def test_step_shapes_are_the_trainers_largest_buckets():
    s = compile_check.step_shapes(_colab())
    # 512-token prompts + 1024 new tokens: the updater pads to 2048, the sampler's cache bucket is 1536.
    assert (s.seq_len, s.cache_len, s.prompt_bucket) == (2048, 1536, 512)
    # 8 problems x (8 + 8) rollouts in one mini-batch; BC: 31 buffered + 8 new experts, padded to 2.
    assert (s.step_rows, s.minibatch_rows, s.num_minibatches, s.bc_rows) == (128, 128, 1, 40)
    assert (s.num_slots, s.max_new_tokens, s.prefill_rows) == (16, 1024, 16)  # 8192 prefill tokens / 512


def test_unknown_topology_is_a_one_line_error():
    with pytest.raises(UserError, match=r"config.mesh.topology 'v9-1' is not a known TPU slice; known: \["):
        _colab(**{"mesh.topology": "v9-1"})


def test_slice_table():
    s = compile_check.SLICES
    assert (s["v5e-1"].chips, s["v5e-1"].hbm_gib, s["v5p-64"].chips, s["v5p-64"].hbm_gib) == (1, 16.0, 32, 95.0)
    assert (s["v6e-8"].topology, s["v6e-8"].chips, s["v6e-8"].hbm_gib) == ("v6e:2x4", 8, 32.0)


def test_use_pallas_follows_the_target_platform_not_the_host():
    cfg = preset("qwen3-0.6b", attention_impl="pallas")
    assert jax.default_backend() != "tpu"
    assert not attention.use_pallas(cfg)            # runs here: XLA attention
    assert attention.use_pallas(dataclasses.replace(cfg, target_platform="tpu"))  # compiled for a TPU


@pytest.mark.skipif(compile_check.libtpu_missing() is None, reason="the fallback is for hosts without libtpu")
def test_without_libtpu_dry_run_says_so_and_prints_the_formula():
    out = compile_check.report(_colab(**{"mesh.topology": "v5e-1"}))
    first, *rest = out.splitlines()
    assert first == ("no XLA compile for v5e-1: libtpu is not installed (pip install -e '.[tpu]'); "
                     "the rough formula only:")
    assert any(line.startswith("formula peak ") and "of 16 GiB per device" in line for line in rest)


# ----------------------------------------------------------------------------- XLA (libtpu) tests


@needs_libtpu
def test_tiny_config_compiles_for_v5e_2x2_with_xla_sizes():
    r = compile_check.check(_tiny())
    assert r.slice.topology == "v5e:2x2" and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    names = [p.name for p in r.programs]
    assert names == ["reshard", "prefill", "insert", "resize", "decode", "old_logprobs", "train_step",
                     "train_step_shared", "bc_step"]
    for p in r.programs:
        assert p.error is None and p.argument > 0 and p.code > 0, p
        assert compile_check.program_peak(p) >= p.argument + p.output - p.alias
    step = next(p for p in r.programs if p.name == "train_step")
    assert step.alias > 0 and step.temp > 0          # the state is donated; activations are temporaries
    decode = next(p for p in r.programs if p.name == "decode")
    reshard = next(p for p in r.programs if p.name == "reshard")
    # During decode the whole train state is resident, during the reshard all but its input (the params).
    assert decode.resident > reshard.resident > 0
    assert r.fits
    text = "\n".join(compile_check.format_result(r))
    assert re.search(r"^  train_step +\d+\.\d\d +\d+\.\d\d", text, re.M)
    assert re.search(r"^verdict: fits: largest \w+ \d+\.\d\d GiB of 16 GiB per chip \(limit 14\.40 GiB", text, re.M)


@needs_libtpu
@pytest.mark.parametrize("name", ["qwen3_0p6b_colab", "qwen1p7b", "qwen8b", "qwen14b"])
def test_every_shipped_configs_mesh_tiles_its_slices_torus(name):
    """qwen14b shipped mesh (1, 8, 8) for v5p-128's 4x4x4 chips: no physical axis product is a tensor axis
    of 8 there, so jax.make_mesh refused it and the run could not start on its own slice."""
    from masa_jax.parallel import mesh as mesh_lib
    config = _config(name, {})
    sl = compile_check.slice_info(config.mesh.topology)
    mesh = mesh_lib.make_mesh(config.mesh.shape, devices=compile_check.topology_devices(sl.name))
    assert mesh.devices.size == sl.chips
    # and its micro-batch splits over the data-parallel chips (qwen14b had 8 for the 16 of its new mesh)
    assert config.rl.micro_batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0


@needs_libtpu
def test_a_mesh_that_does_not_tile_the_torus_is_a_one_line_error():
    from masa_jax.parallel import mesh as mesh_lib
    with pytest.raises(UserError, match=r"config\.mesh\.shape=\(1, 8, 8\) does not fit the physical mesh of the 64 "
                                        r"devices: each axis must be a product of physical axis sizes "
                                        r"\(jax: .*remaining assignable mesh \[4, 4, 4\]\)") as e:
        mesh_lib.make_mesh((1, 8, 8), devices=compile_check.topology_devices("v5p-128"))
    assert "\n" not in str(e.value)


@needs_libtpu
def test_lora_and_qlora_runs_compile_with_the_adapters_state_and_a_smaller_base():
    """LoRA: the train step's arguments hold the adapters' AdamW moments, not the model's; QLoRA (int8 base):
    the sampler's weights and the frozen base shrink again; every program of the step compiles for v5e."""
    progs = ("reshard", "decode", "old_logprobs", "train_step", "bc_step")
    full = {p.name: p for p in compile_check.check(_tiny(), programs=progs).programs}
    lo = {p.name: p for p in compile_check.check(_tiny(**{"lora.rank": 4}), programs=progs).programs}
    q8 = {p.name: p for p in compile_check.check(_tiny(**{"lora.rank": 4, "lora.base_quantization": "int8"}),
                                                 programs=progs).programs}
    for r in (lo, q8):
        assert list(r) == list(progs) and all(p.error is None and p.argument > 0 for p in r.values()), r
    assert lo["train_step"].argument < full["train_step"].argument
    assert q8["train_step"].argument < lo["train_step"].argument
    assert q8["decode"].argument < lo["decode"].argument   # int8 projections instead of bfloat16
    assert q8["old_logprobs"].argument < lo["old_logprobs"].argument


@needs_libtpu
def test_oversize_micro_batch_is_refused_naming_the_program():
    # 32768 sequences of 128 tokens per micro-batch, 8192 per chip (measured 2026-12-04: 8192 per
    # micro-batch needs 9.03 GiB of a chip; four times that is over a v5e's 15.75 usable GiB).
    r = compile_check.check(_tiny(**{"rl.micro_batch_size": 32768}), programs=("train_step",))
    (step,) = r.programs
    assert step.name == "train_step" and step.error.startswith("RESOURCE_EXHAUSTED")
    assert not r.fits
    text = "\n".join(compile_check.format_result(r))
    assert "  train_step         does not fit: RESOURCE_EXHAUSTED" in text
    assert "verdict: does not fit: train_step (XLA: RESOURCE_EXHAUSTED on v5e-4)" in text


@needs_libtpu
def test_a_kv_cache_too_large_for_the_chip_is_a_verdict_not_a_traceback():
    """qwen14b's 512 slots per host asked for a 240 GB cache per v5p chip: XLA refused the cache's own
    init, outside any program the check judged, and the check died with a traceback."""
    r = compile_check.check(_tiny(**{"rollout.num_slots": 1 << 20}), programs=("decode",))
    assert [p.name for p in r.programs] == ["kv_cache"] and r.programs[0].error.startswith("RESOURCE_EXHAUSTED")
    assert not r.fits
    assert "verdict: does not fit: kv_cache" in "\n".join(compile_check.format_result(r))


@needs_libtpu
def test_pallas_attention_compiles_the_tpu_kernel_from_a_cpu_host(monkeypatch):
    """Before the fix use_pallas read jax.default_backend() ("cpu" here): the TPU compile measured XLA
    attention. Now the prefill compiled for v5e has splash attention's Mosaic custom call."""
    import importlib
    engine = importlib.import_module("masa_jax.sampling.engine")
    seen, lower = [], engine.prefill.lower

    def spy(*a, **k):
        lowered = lower(*a, **k)
        seen.append(lowered.as_text())
        return lowered
    monkeypatch.setattr(engine.prefill, "lower", spy, raising=False)
    r = compile_check.check(_tiny(**{"model.attention_impl": "pallas"}), programs=("prefill",))
    assert [p.name for p in r.programs] == ["prefill"] and r.programs[0].error is None
    assert len(seen) == 1 and "tpu_custom_call" in seen[0]


@needs_libtpu
def test_dry_run_cli_prints_xla_sizes_and_the_formula():
    flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
    out = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/tiny.py", "--dry_run", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "XLA compile for TPU v5e-4 (libtpu topology v5e:2x2: 4 chips of 16 GiB HBM)" in text
    assert re.search(r"^  decode +\d+\.\d\d", text, re.M) and "verdict: fits: largest" in text
    assert "per-device memory, rough formula" in text and "formula peak" in text
    assert "compiled train_step" in out.stderr  # progress goes to stderr
