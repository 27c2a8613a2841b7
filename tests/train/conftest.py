"""Shared fixtures of the trainer tests: a tiny random Qwen3 on the toy tokenizer, and a small config."""
from __future__ import annotations

import os
import shutil

import jax
import pytest

from masa_jax.config import base_config
from masa_jax.models import qwen
from masa_jax.toy import tokenizer as toy_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen3 over the toy tokenizer, saved as a complete HF directory."""
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    tok = toy_tokenizer.load_tokenizer()
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                           max_position_embeddings=1024, eos_token_id=tok.eos_token_id)
    params = qwen.init_params(cfg, jax.random.key(0))
    qwen.save_pretrained(cfg, params, path)
    for name in os.listdir(toy_tokenizer.TOKENIZER_DIR):
        shutil.copy(os.path.join(toy_tokenizer.TOKENIZER_DIR, name), path)
    return path


@pytest.fixture
def small_config():
    """`small_config(model_dir, algorithm, **dotted_overrides)` -> a ConfigDict."""
    return make_small_config


def make_small_config(model_dir: str, algorithm: str = "masa", **overrides):
    """A few-second config: 2 problems per step, G = M = 2, short responses, float32 on CPU."""
    c = base_config()
    c.algorithm = algorithm
    c.total_steps = 3
    c.model.path = model_dir
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.mesh.shape = (1, -1, 1)
    c.data.train_files = ("toy:64",)
    c.data.problems_per_step = 2
    c.data.max_prompt_length = 512
    c.rollout.num_solutions = 2
    c.rollout.num_meta = 2
    c.rollout.max_response_length = 24
    c.rollout.meta_max_new_tokens = 24
    c.rollout.num_slots = 8
    c.prompts.min_solution_length = 4
    c.prompts.meta_template = ("Assess {question} Write <meta>...</meta>, then JSON with math_notion, "
                               "pass_rate (0-{k}), solution_length ({min_length}-{max_length}).")
    c.prompts.solution_template = "{question} Answer in \\boxed{{}}."
    c.efficient.switch_step = 1
    c.bc.buffer_size = 2
    c.bc.steps = 1
    c.bc.min_notion_reward = 0.0
    c.rl.lr = 1e-3
    c.rl.warmup_steps = 1
    c.rl.micro_batch_size = 2
    c.rl.chunk_size = 64
    c.reward.num_workers = 1
    c.checkpoint.every = 1
    c.checkpoint.max_to_keep = 3
    c.log.tensorboard = True
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
