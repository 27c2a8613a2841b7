"""qwen.from_pretrained / save_pretrained against transformers: logits parity, export round trip,
sharded bf16 checkpoints, streaming reads, and the error messages for broken inputs."""
from __future__ import annotations

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from masa_jax.models import qwen
from masa_jax.models.qwen import checkpoint
from masa_jax.models.qwen.params import hf_names, param_rules

KINDS = ("qwen3_tied", "qwen3_untied", "qwen2")  # the hf_models fixture's keys
LENGTHS = (12, 7, 3)  # mixed prompt lengths, left padded to T = 12 (each extra length is a compile)
T = 12


@pytest.fixture(scope="module")
def loaded(hf_models):
    """kind -> (cfg, params) loaded through the real from_pretrained path."""
    return {kind: qwen.from_pretrained(d) for kind, (_, d) in hf_models.items()}


@pytest.fixture(scope="module")
def forward():
    return jax.jit(qwen.forward, static_argnums=0)


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_with_left_padding(kind, hf_models, loaded, forward, hf_logits_fn,
                                                     padded_batch):
    model, _ = hf_models[kind]
    cfg, params = loaded[kind]
    assert cfg.tie_word_embeddings == (kind == "qwen3_tied") and ("lm_head" in params) != cfg.tie_word_embeddings
    assert cfg.rope_theta == 5000.0 and cfg.family == kind[:5]
    tokens, mask = padded_batch(LENGTHS, T, cfg.vocab_size)
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    ref = hf_logits_fn(model, tokens, mask)
    assert ours.shape == (len(LENGTHS), T, cfg.vocab_size) and ours.dtype == np.float32
    assert np.abs(ours - ref)[mask].max() <= 1e-4
    # Padding must not change the real tokens' logits: each padded row equals its unpadded run.
    for b, n in enumerate(LENGTHS):
        row = tokens[b:b + 1, T - n:]
        alone = np.asarray(forward(cfg, params, jnp.asarray(row), jnp.ones(row.shape, bool)))[0]
        assert np.abs(ours[b, T - n:] - alone).max() <= 1e-5
        assert np.abs(alone - hf_logits_fn(model, row)[0]).max() <= 1e-4
    assert np.abs(ours[mask]).max() > 0.1  # a real signal, not an all-zero model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_on_rows_long_enough_for_the_cpu_paths(scan_layers, hf_models, hf_logits_fn,
                                                                        padded_batch):
    """128-token rows (causal attention in two query blocks), 4 x 128 = 512 tokens (the MLP's stacked
    gate / up matmul), the layers scanned or looped: still transformers' logits."""
    model, path = hf_models["qwen3_tied"]
    cfg, params = qwen.from_pretrained(path, scan_layers=scan_layers)
    tokens, mask = padded_batch((128, 100, 63, 17), 128, cfg.vocab_size, seed=3)
    ours = np.asarray(jax.jit(qwen.forward, static_argnums=0)(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - hf_logits_fn(model, tokens, mask))[mask].max() <= 1e-4
    assert np.abs(ours[mask]).max() > 0.1


def test_compute_dtype_and_overrides(hf_models):
    _, d = hf_models["qwen2"]
    cfg, params = qwen.from_pretrained(d, dtype=jnp.bfloat16, remat="full")  # compute dtype follows dtype
    assert (cfg.param_dtype, cfg.dtype, cfg.remat) == ("bfloat16", "bfloat16", "full")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    cfg32, _ = qwen.from_pretrained(d, compute_dtype=jnp.bfloat16)
    assert (cfg32.param_dtype, cfg32.dtype) == ("float32", "bfloat16")
    with pytest.raises(TypeError, match="compute_dtype"):
        qwen.from_pretrained(d, param_dtype="float32")


# ------------------------------------------------------------------------------------ export round trip


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip_through_transformers(kind, hf_models, loaded, tmp_path, hf_logits_fn,
                                                        padded_batch):
    from transformers import AutoModelForCausalLM

    model, _ = hf_models[kind]
    cfg, params = loaded[kind]
    qwen.save_pretrained(cfg, params, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(model) and back.dtype == torch.float32
    tokens, mask = padded_batch(LENGTHS, T, cfg.vocab_size, seed=1)
    diff = np.abs(hf_logits_fn(back, tokens, mask) - hf_logits_fn(model, tokens, mask))[mask]
    assert diff.max() <= 1e-5
    # And our own loader reads our writer back bit for bit.
    cfg2, params2 = qwen.from_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_save_sharded_bf16(hf_models, loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = hf_models["qwen3_untied"]
    cfg, params = loaded["qwen3_untied"]
    out = tmp_path / "bf16"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # an earlier single file must not shadow the shards
    qwen.save_pretrained(cfg, params, out, dtype=jnp.bfloat16, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).stat().st_size <= 40_000 + 4_096 for f in files)  # one tensor + header may spill
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.dtype == torch.bfloat16
    ref = model.state_dict()
    for name, value in back.state_dict().items():
        expect = ref[name].to(torch.bfloat16)
        assert torch.equal(value, expect), name


# ------------------------------------------------------------------------- sharded / bf16 checkpoints


def test_load_three_file_bf16_checkpoint(sharded_bf16_dir, forward, hf_logits_fn, padded_batch):
    d, ref_model, state = sharded_bf16_dir
    assert len(list(d.glob("*.safetensors"))) == 3
    cfg, params = qwen.from_pretrained(d)  # bf16 on disk -> float32 params
    assert params["layers"]["q_proj"].dtype == jnp.float32
    tokens, mask = padded_batch(LENGTHS, T, cfg.vocab_size, seed=2)
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - hf_logits_fn(ref_model, tokens, mask))[mask].max() <= 1e-4
    # bf16 params are the checkpoint's bits, unconverted.
    cfg16, p16 = qwen.from_pretrained(d, dtype="bfloat16")
    w = state["model.layers.2.self_attn.o_proj.weight"].view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    got = np.asarray(p16["layers"]["o_proj"][2]).reshape(-1, cfg.hidden_size).T
    np.testing.assert_array_equal(got.view(np.uint16), w.view(np.uint16))


def test_layout_transforms_are_lazy_views_of_the_memmap(sharded_bf16_dir):
    """Every to_ours is a view, so slicing it reads only the shard (never the whole tensor)."""
    d, _, _ = sharded_bf16_dir
    tensors = checkpoint.open_checkpoint(d)
    assert all(isinstance(v.base, np.memmap) or isinstance(v, np.memmap) for v in tensors.values())
    cfg, _ = qwen.from_pretrained(d, dtype="bfloat16")
    for rule in param_rules(cfg):
        src = tensors[hf_names(rule, cfg)[0]]
        assert np.may_share_memory(rule.to_ours(src, cfg), src), rule.hf_name


def test_shard_reads_touch_only_the_requested_layers(sharded_bf16_dir):
    d, _, _ = sharded_bf16_dir
    tensors = checkpoint.open_checkpoint(d)
    cfg = qwen.ModelConfig.from_hf_dict(json.loads((d / "config.json").read_text()))

    class Recording(dict):
        def __getitem__(self, k):
            seen.append(k)
            return super().__getitem__(k)

    seen: list[str] = []
    rule = next(r for r in param_rules(cfg) if r.path == ("layers", "gate_proj"))
    # Layers 1..2, embed rows 16..32, mlp columns 48..96: one device's shard.
    index = ((1, 3, 1), (16, 32, 1), (48, 96, 1))
    out = checkpoint._read_shard(rule, cfg, Recording(tensors), index, np.dtype(np.float32))
    assert seen == ["model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.gate_proj.weight"]
    full = tensors["model.layers.2.mlp.gate_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(out[1], full[16:32, 48:96])


# -------------------------------------------------------------------------------------------- errors


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_paths(hf_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        qwen.from_pretrained(tmp_path / "nowhere")
    d = _copy(hf_models["qwen2"][1], tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen.from_pretrained(d)
    d = _copy(hf_models["qwen2"][1], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        qwen.from_pretrained(d)


def test_index_points_to_missing_shard(sharded_bf16_dir, tmp_path):
    d = _copy(sharded_bf16_dir[0], tmp_path / "c")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing shard file .*model-00002-of-00003.safetensors"):
        qwen.from_pretrained(d)


def test_unsupported_configs(hf_models, tmp_path):
    for key, value, match in [("architectures", ["LlamaForCausalLM"], "unknown architecture"),
                              ("use_sliding_window", True, "sliding-window")]:
        d = _copy(hf_models["qwen2"][1], tmp_path / key)
        hf = json.loads((d / "config.json").read_text())
        hf[key] = value
        if key == "architectures":
            hf["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(hf))
        with pytest.raises(qwen.UnsupportedConfigError, match=match):
            qwen.from_pretrained(d)


def test_missing_tensor_and_shape_mismatch(hf_models, tmp_path, write_sharded_fn):
    model, src = hf_models["qwen3_untied"]
    config = json.loads((src / "config.json").read_text())
    state = dict(model.state_dict())
    del state["model.layers.1.self_attn.k_norm.weight"]
    d = tmp_path / "missing"
    write_sharded_fn(state, d, 2, config)
    with pytest.raises(checkpoint.CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        qwen.from_pretrained(d)
    # The config says intermediate 80, the tensors have 96: name the tensor and both shapes.
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*\(96, 64\).*\(80, 64\)"):
        qwen.from_pretrained(src, intermediate_size=80)
    # Untied config over a tied checkpoint: lm_head.weight is required and absent.
    with pytest.raises(checkpoint.CheckpointError, match="'lm_head.weight' is missing"):
        qwen.from_pretrained(hf_models["qwen3_tied"][1], tie_word_embeddings=False)


def _corrupt(src, dst, data: bytes):
    d = _copy(src, dst)
    (d / "model.safetensors").write_bytes(data)
    return d


def test_corrupt_headers(hf_models, tmp_path):
    src = hf_models["qwen2"][1]
    good = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = "model.layers.0.self_attn.q_proj.bias"
    header[name]["data_offsets"][1] += 4
    shifted = json.dumps(header).encode()
    cases = [
        (b"\x01\x02", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 10 ** 12) + good[8:], "header length 1000000000000 exceeds the file size"),
        (struct.pack("<Q", 8) + b"not json" + good[16:], "not valid JSON"),
        (struct.pack("<Q", len(shifted)) + shifted + good[8 + n:], f"tensor '{name}'.*data_offsets"),
        (good[:len(good) // 2], "data_offsets"),  # truncated data
    ]
    for i, (data, match) in enumerate(cases):
        d = _corrupt(src, tmp_path / f"bad{i}", data)
        with pytest.raises(checkpoint.CheckpointError, match=f"corrupt safetensors header in .*bad{i}.*{match}"):
            qwen.from_pretrained(d)


def test_parse_size():
    assert checkpoint.parse_size("5GB") == 5 * 10 ** 9
    assert checkpoint.parse_size("2GiB") == 2 * 2 ** 30
    assert checkpoint.parse_size("40KB") == 40_000
    assert checkpoint.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        checkpoint.parse_size("lots")


def test_export_loads_and_generates_from_the_directory_alone(tmp_path):
    """The exported directory alone (tokenizer + model + generation_config) is enough for transformers:
    a chat prompt encoded by the exported tokenizer decodes greedily to the same tokens as masa_jax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from masa_jax import sampling
    from masa_jax.toy.tokenizer import TOKENIZER_DIR
    from masa_jax.toy.defaults import BASE_MODEL_DIR

    cfg, params = qwen.from_pretrained(BASE_MODEL_DIR)
    out = tmp_path / "export"
    qwen.save_pretrained(cfg, params, out, tokenizer_dir=TOKENIZER_DIR)
    tok = AutoTokenizer.from_pretrained(out)
    hf_cfg = json.loads((out / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(out)
    pad = tok.pad_token_id if tok.pad_token_id is not None else cfg.eos_token_id[0]
    assert hf_cfg["pad_token_id"] == gen.pad_token_id == pad
    assert gen.eos_token_id == hf_cfg["eos_token_id"] == list(cfg.eos_token_id)
    assert gen.bos_token_id == cfg.bos_token_id

    text = tok.apply_chat_template([{"role": "user", "content": "2 + 3 = ?"}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    n_new = 16
    ours = sampling.generate(cfg, params, [prompt], rng=jax.random.key(0), max_new_tokens=n_new,
                             temperature=0.0, eos_ids=cfg.eos_token_id).tokens[0]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # generation_config.json supplies eos / pad: no ids passed here
        hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=n_new)[0, len(prompt):].tolist()
    assert len(ours) >= 4
    assert ours == hf, (tok.decode(ours), tok.decode(hf))
