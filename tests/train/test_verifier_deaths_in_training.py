"""A training run whose verifier workers are SIGKILLed again and again (issue #19 item 3) finishes, and
the answers only math-verify can judge are scored right in every step."""
from __future__ import annotations

import collections
import json
import os
import re
import sys

import numpy as np
import pytest

from masa_jax import train
from masa_jax.tokenization import load_codec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewards"))
from test_rewards_worker_deaths import WorkerKiller, _worker_start_and_first_chunk_s  # noqa: E402

pytestmark = pytest.mark.slow  # a real (3-step) training run


class SqrtPolicy:
    """Answers "Simplify K/sqrt(2)." with a different but equal fraction per rollout when K is even
    (right), with (K+1)/sqrt(2) when K is odd (wrong): no answer is decided by string or number
    comparison, every one goes to a worker. Records the expected correctness per call."""

    def __init__(self, codec):
        self.codec = codec
        self.expected: list[list[bool]] = []

    def __call__(self, prompt_ids, budgets, max_new_tokens, rng):
        Out = collections.namedtuple("Out", "tokens logprobs finish_reasons")
        tokens, expected, seen = [], [], collections.Counter()
        for ids in prompt_ids:
            k = int(re.search(r"Simplify (\d+)/", self.codec.decode(ids)).group(1))
            j = seen[k] = seen[k] + 1
            num = k if k % 2 == 0 else k + 1
            out = f"So \\boxed{{\\frac{{{j * num}}}{{{j}\\sqrt{{2}}}}}}"
            tokens.append(self.codec.encode(out)[:max_new_tokens] + [self.codec.end_of_turn])
            expected.append(k % 2 == 0)
        self.expected.append(expected)
        return Out(tokens, [np.full(len(t), -1.0, np.float32) for t in tokens], ["eos"] * len(tokens))


def test_training_survives_workers_killed_again_and_again(tiny_model_dir, small_config, tmp_path):
    data = tmp_path / "sqrt.jsonl"
    with open(data, "w") as f:
        for k in range(1, 33):
            f.write(json.dumps({"problem": f"Simplify {k}/sqrt(2).", "answer": f"\\frac{{{k}\\sqrt{{2}}}}{{2}}"}) + "\n")
    config = small_config(tiny_model_dir, "grpo", total_steps=5, **{
        "data.train_files": (str(data),), "data.problems_per_step": 4, "rollout.num_solutions": 4,
        "rollout.max_response_length": 64, "rl.micro_batch_size": 4})
    policy = SqrtPolicy(load_codec(tiny_model_dir))
    # Each worker lives 1.5x what a start and its first 16-item chunk take on this host now (a step's
    # batch is 16 answers), then dies: every worker of the run is killed, from the pool's start-up on.
    life_s = 1.5 * _worker_start_and_first_chunk_s(chunk_size=16)
    with WorkerKiller(life_s=life_s) as killer:
        history = train.train(config, str(tmp_path / "run"), generate_fn=policy)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert killer.kills >= 2, (killer.kills, life_s)
    assert len(policy.expected) == 5
    for record, expected in zip(history, policy.expected):
        assert record["acc/solution"] == pytest.approx(np.mean(expected)), record
        assert record["verify/unfinished"] == record["verify/errors"] == 0, record
        assert record["verify/parsed_checks"] == 16, record  # nothing was decided without a worker
    deaths = sum(h["verify/restarts"] + h["verify/start_failures"] for h in history)
    assert deaths >= 1, history
