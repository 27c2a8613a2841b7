"""GRPO raises held-out accuracy on the toy world (issue 12): ten steps of configs/tiny.py with
`algorithm=grpo`, from the shipped base model, with the run's own held-out evaluation before the first
and after the last step.

The base model answers about half of the problems with an unworked estimate (experiments/build_toy_base.py);
what GRPO learns on its training problems (work the problem out) carries over to held-out ones it never
trains on. Measured (docs/results.md): level 1 0.50 -> 0.95 and all levels 0.16 -> 0.27 after 10 steps on
100 held-out problems; the bars below are well inside that, so a broken update, advantage or sign fails
them and noise does not."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from masa_jax import train

pytestmark = pytest.mark.slow  # ten RL steps of the shipped model (~40 s on 2 cores)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_ten_grpo_steps_raise_held_out_accuracy(tmp_path):
    c = _tiny_config()
    c.algorithm = "grpo"
    c.total_steps = 10
    c.eval.files = ("toy-heldout:50:98765",)  # 10 problems per level, never trained on
    c.eval.num_samples = 8
    c.log.tensorboard = False
    c.checkpoint.every = 10
    train.train(c, str(tmp_path / "run"))
    with open(tmp_path / "run" / "eval.jsonl") as f:
        first, last = [json.loads(line) for line in f]
    assert (first["step"], last["step"]) == (0, 10)
    assert first["eval/accuracy_level_1"] <= 0.75  # the base model estimates about half the time
    assert last["eval/accuracy_level_1"] >= first["eval/accuracy_level_1"] + 0.2
    assert last["eval/accuracy"] >= first["eval/accuracy"] + 0.05
