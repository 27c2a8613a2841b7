"""Shared fixtures for the model tests: tiny random HF Qwen checkpoints built offline once per session,
and the reference helpers (transformers logits, left-padded batches, a reference sharded writer).

Every param (biases and norms included) is perturbed away from HF's init so that a mis-mapped bias or
norm changes the logits; torch is the float32 CPU reference. Helpers are handed out as fixtures because
the suite runs with --import-mode=importlib (test modules cannot import each other or this file).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

# Divisible by both test meshes ((2,2,2), (1,4,2)): hidden 64 / fsdp 4, vocab 128, mlp 96, heads / tensor 2.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
KINDS = ("qwen3_tied", "qwen3_untied", "qwen2")


def build_hf_model(kind: str, seed: int = 0):
    """A random float32 transformers model of the given kind ("qwen3_tied", "qwen3_untied", "qwen2")."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 5000.0}  # not the default, so a wrong theta shows
    if kind.startswith("qwen3"):
        # Qwen3Config.head_dim defaults to 128 whatever the hidden size: set it.
        cfg = Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=kind == "qwen3_tied", rope_parameters=rope)
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**TINY, tie_word_embeddings=False, rope_parameters=rope)
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, T, V] transformers logits; positions count real tokens only (as our model does)."""
    import torch

    if mask is None:
        mask = np.ones(tokens.shape, bool)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def random_params(cfg, rng: np.random.RandomState, std: float = 0.2):
    """float32 params of `cfg` from numpy (no compile of a jax RNG graph): weights ~ N(0, std), norm weights
    1 + N(0, std), away from 1 so their gradients are not special; std 0.2 gives peaked, varied logits."""
    import jax
    import jax.numpy as jnp
    from masa_jax.models import qwen

    return jax.tree.map_with_path(
        lambda path, s: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + std * rng.randn(*s.shape), jnp.float32),
        qwen.param_shapes(cfg))


def left_padded_batch(lengths, T: int, vocab: int, seed: int = 0):
    """int32 tokens [B, T] and bool mask [B, T] with row b's last lengths[b] tokens real."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (len(lengths), T)).astype(np.int32)
    mask = np.zeros((len(lengths), T), bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
        tokens[b, :T - n] = 0
    return tokens, mask


def write_sharded(state: dict, directory, n_files: int, config: dict) -> list[str]:
    """Writes a torch state dict as `n_files` safetensors files + index with the reference writer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    groups = np.array_split(np.arange(len(names)), n_files)
    files = [f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]
    weight_map = {}
    for fname, idx in zip(files, groups):
        part = {names[i]: state[names[i]].contiguous() for i in idx}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return files

@pytest.fixture(scope="session")
def hf_logits_fn():
    return hf_logits


@pytest.fixture(scope="session")
def random_params_fn():
    return random_params


@pytest.fixture(scope="session")
def padded_batch():
    return left_padded_batch


@pytest.fixture(scope="session")
def write_sharded_fn():
    return write_sharded


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> (float32 transformers model, its save_pretrained directory)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in KINDS:
        model = build_hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


@pytest.fixture(scope="session")
def sharded_bf16_dir(hf_models, tmp_path_factory):
    """The untied Qwen3 model as a 3-file bfloat16 checkpoint with an index; also returns the HF model
    with its weights rounded to bf16 and back (the float32 reference for it)."""
    import torch

    model, src = hf_models["qwen3_untied"]
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    d = tmp_path_factory.mktemp("sharded_bf16")
    files = write_sharded(state, d, 3, config)
    assert len(files) == 3
    ref = build_hf_model("qwen3_untied")
    ref.load_state_dict({k: v.float() for k, v in state.items()})
    return d, ref.eval(), state
