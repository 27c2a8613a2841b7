"""Hyper-parameters that follow the authors' akatigre/MASA-RL scripts (train_masagrpo.sh, eval/inference.py)."""

import importlib.util
import os

import pytest

from masa_jax.config import base_config, resolve
from masa_jax.evaluation import paper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["qwen8b", "qwen14b"])
def test_mini_batch_is_the_authors_ppo_mini_batch_size(name):
    assert resolve(_config(name)).rl.mini_batch_size == 128  # train_masagrpo.sh: ppo_mini_batch_size=128


def test_default_mini_batch_and_paper_top_p():
    assert base_config().rl.mini_batch_size == 128
    assert paper.PAPER["top_p"] == 1.0  # eval/inference.py: SamplingParams(top_p=1.0)
