"""Shared fixtures for the RL tests: a tiny random Qwen3, a 1-device mesh, ragged RL batches, and the
jitted step functions built once per session (compiling is most of these tests' cost on CPU).

Helpers are fixtures because the suite runs with --import-mode=importlib.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from masa_jax.models.qwen import ModelConfig, init_params
from masa_jax.parallel.mesh import make_mesh
from masa_jax.rl import bc, train_step as ts

TINY = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8)
N, T = 8, 16
MICRO = 2  # 4 micro-batches of 2 sequences
# chunk 8 < T so the log-prob scan really runs over several chunks.
LOSS = ts.LossConfig(chunk_size=8)
# Adam eps 1e-4 (not 1e-8) so comparisons of updates across accumulation orders are not dominated by
# Adam normalising float32 noise in near-zero gradients (see sharded_step_main.py).
OPTIM = ts.OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-4)
BC_LR = 1e-3  # the BC step's constant learning rate


def make_batch(seed: int = 0, n: int = N, t: int = T) -> dict[str, np.ndarray]:
    """A ragged RL batch: left-padded prompts of different lengths, responses of different lengths with
    right padding, one all-padding row; advantages of both signs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (n, t)).astype(np.int32)
    attn = np.zeros((n, t), bool)
    loss = np.zeros((n, t), bool)
    for i in range(n - 1):
        start = int(rng.integers(0, 4))            # left padding
        prompt_end = int(rng.integers(start + 2, 8))
        end = int(rng.integers(prompt_end + 1, t + 1))  # right padding after the response
        attn[i, start:end] = True
        loss[i, prompt_end:end] = True
    tokens[~attn] = 0
    adv = rng.normal(size=n).astype(np.float32)
    adv[-1] = 0.0
    return dict(tokens=tokens, attention_mask=attn, loss_mask=loss, advantages=adv)


@pytest.fixture(scope="session")
def tiny():
    return TINY


@pytest.fixture(scope="session")
def batch_fn():
    return make_batch


@pytest.fixture(scope="session")
def host_params():
    """float32 params as host NumPy arrays: every create_train_state gets fresh device buffers."""
    return jax.device_get(init_params(TINY, jax.random.key(0), std=0.05))


@pytest.fixture(scope="session")
def mesh1():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def cfgs():
    return LOSS, OPTIM, MICRO


@pytest.fixture(scope="session")
def compute_logprobs(mesh1):
    return ts.make_compute_logprobs(TINY, mesh1, MICRO, chunk_size=LOSS.chunk_size)


@pytest.fixture(scope="session")
def rl_step(mesh1):
    return ts.make_train_step(TINY, LOSS, OPTIM, mesh1, MICRO)


@pytest.fixture(scope="session")
def bc_lr():
    return BC_LR


@pytest.fixture(scope="session")
def bc_step(mesh1):
    return bc.make_bc_step(TINY, OPTIM, mesh1, MICRO, lr=BC_LR, chunk_size=LOSS.chunk_size)


@pytest.fixture(scope="session")
def rl_batch(host_params, mesh1, compute_logprobs):
    """make_batch(0) with old log-probs = current log-probs + noise, so the ratios fall in every clip
    region (an update from exactly on-policy data would never clip)."""
    b = make_batch(0)
    state = ts.create_train_state(TINY, host_params, OPTIM, mesh1)
    with jax.set_mesh(mesh1):
        lp, _ = compute_logprobs(state.params, b)
    noise = np.random.default_rng(1).normal(0, 0.4, lp.shape).astype(np.float32)
    b["old_logprobs"] = np.where(b["loss_mask"], np.asarray(lp) + noise, 0.0).astype(np.float32)
    return b
