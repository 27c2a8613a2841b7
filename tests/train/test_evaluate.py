"""`python -m masa_jax.evaluate` on an HF directory and on a training run's checkpoint: pass@k numbers
are computed from the verified samples and written as JSON."""
import json
import os
import subprocess
import sys

import numpy as np

from masa_jax import evaluate
from masa_jax.toy import world
import pytest


pytestmark = pytest.mark.slow  # end to end: the evaluation CLI

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_file(path, n=3):
    with open(path, "w") as f:
        for p in world.heldout(n, seed=7):
            f.write(json.dumps({"problem": p.question, "answer": p.answer}) + "\n")
    return path


def test_evaluate_scores_passes_with_the_unbiased_estimator():
    """A scripted policy whose k-th sample of problem i is right iff k < i: pass@1 and pass@2 by hand."""
    problems = list(world.heldout(3, seed=7))

    class Codec:
        def encode_chat(self, messages):
            return [len(messages[-1]["content"])]

        def decode(self, ids):
            return ids[0]

    n = 4

    def generate(prompts, budgets, max_new_tokens, rng):
        texts = []
        for i in range(len(problems)):
            for k in range(n):
                texts.append(f"\\boxed{{{problems[i].answer if k < i else 'x'}}}")
        from collections import namedtuple
        return namedtuple("O", "tokens finish_reasons")([[t] for t in texts], ["max_new_tokens"] * len(texts))

    def verify(texts, answers):
        return np.array([t == f"\\boxed{{{a}}}" for t, a in zip(texts, answers)]), {}

    r = evaluate.evaluate_problems(problems, generate, Codec(), verify, n=n, ks=(1, 2, 4), max_new_tokens=8,
                                   rng=None)
    c = np.array([0, 1, 2])  # correct samples per problem
    assert r["pass@1"] == c.sum() / 12
    pass2 = np.mean([1 - (n - ci) * (n - ci - 1) / (n * (n - 1)) for ci in c])
    assert abs(r["pass@2"] - pass2) < 1e-12
    assert r["pass@4"] == 2 / 3


def test_evaluate_cli_on_hf_dir_and_on_a_run(tiny_model_dir, small_config, tmp_path):
    data = _bench_file(str(tmp_path / "bench.jsonl"))
    out = tmp_path / "eval.json"
    common = [sys.executable, "-m", "masa_jax.evaluate", "--config=configs/tiny.py",
              f"--config.model.path={tiny_model_dir}", f"--data={data}", "--n=2", "--k=1,2",
              "--max_new_tokens=8", f"--output={out}"]
    res = subprocess.run(common + [f"--checkpoint={tiny_model_dir}"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.load(open(out))["bench.jsonl"]
    assert result["problems"] == 3 and result["n"] == 2
    assert 0.0 <= result["pass@1"] <= result["pass@2"] <= 1.0
    assert "pass@2" in res.stdout
    # The same on a training run's newest checkpoint.
    from masa_jax import train
    run_dir = tmp_path / "run"
    train.train(small_config(tiny_model_dir, "grpo", total_steps=1), str(run_dir))
    res = subprocess.run(common + [f"--checkpoint={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(out))["bench.jsonl"]["problems"] == 3
