"""End-to-end trainer tests on CPU: every algorithm runs, checkpoints restore, resume is exact, and
MASA-efficient's gating / cutoff / hints act on the rollouts."""
from __future__ import annotations

import collections
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from masa_jax import train
from masa_jax.tokenization import load_codec
from masa_jax.toy import world

pytestmark = pytest.mark.slow  # end to end: real training runs


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _finite_metrics(history):
    for record in history:
        for key, value in record.items():
            assert value is None or math.isfinite(value), (key, value)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "masa", "masa_efficient"])
def test_algorithm_runs_end_to_end_with_the_sampler(tiny_model_dir, small_config, tmp_path, algorithm):
    config = small_config(tiny_model_dir, algorithm, total_steps=2)
    history = train.train(config, str(tmp_path))
    assert [h["step"] for h in history] == [1, 2]
    _finite_metrics(history)
    keys = set(history[-1])
    assert {"acc/solution", "tokens/solution", "time/step_s"} <= keys
    if algorithm == "dapo":  # a random model solves nothing: every group is dropped (the update: next test)
        assert "dapo/rounds" in keys and history[-1].get("actor/empty_batch") == 1.0
    else:
        assert {"actor/loss", "actor/grad_norm", "actor/logprob_gap_mean"} <= keys
    if algorithm in ("masa", "masa_efficient"):
        assert {"reward/meta_total", "reward/meta_length", "reward/meta_difficulty", "reward/meta_notion",
                "bc/buffer_size"} <= keys
    if algorithm == "masa_efficient":
        assert history[-1]["efficient/active"] == 1.0 and "gate/fraction" in keys
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    assert os.path.exists(tmp_path / "config.json")
    assert os.listdir(tmp_path / "tb")  # TensorBoard events
    if algorithm in ("masa", "masa_efficient"):
        for fig in ("calibration.png", "meta_rewards.png"):
            assert (tmp_path / "figures" / fig).stat().st_size > 1000
        calib = [json.loads(line) for line in open(tmp_path / "calibration.jsonl")]
        assert [r["step"] for r in calib] == [1, 2] and len(calib[0]["pred"]) == len(calib[0]["true"])
    # Only the figures the algorithm has data for (no empty plots, no warnings about them).
    figures = set(os.listdir(tmp_path / "figures")) if os.path.isdir(tmp_path / "figures") else set()
    assert ("meta_rewards.png" in figures) == (algorithm in ("masa", "masa_efficient"))
    assert ("gating.png" in figures) == (algorithm == "masa_efficient")
    # A second invocation finds the finished run's checkpoint and restores it instead of training.
    again = train.train(config, str(tmp_path))
    assert [h["step"] for h in again] == [1, 2]


def test_dapo_updates_on_the_toy_model(tmp_path):
    """DAPO's filtered batch reaches the update: the shipped toy model solves some of its problems, so groups
    with mixed rewards survive dynamic sampling and the policy loss runs on them (the random model above
    only exercises the empty-batch path)."""
    from masa_jax import config as config_lib
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(REPO, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.algorithm, config.total_steps, config.eval.files = "dapo", 1, ()
    history = train.train(config_lib.resolve(config), str(tmp_path))
    last = history[-1]
    assert last.get("actor/empty_batch", 0.0) == 0.0, last
    assert math.isfinite(last["actor/loss"]) and last["actor/grad_norm"] > 0
    assert last["dapo/kept_groups"] > 0 and last["dapo/rounds"] >= 1


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(train.TIMING_PREFIXES)}


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(tiny_model_dir, small_config, tmp_path,
                                                                     monkeypatch):
    config = small_config(tiny_model_dir, "masa", total_steps=4)
    full = train.train(config, str(tmp_path / "full"))
    part = train.train(config, str(tmp_path / "split"), stop_after=2)
    assert len(part) == 2

    def no_weights(*a, **k):  # a resume restores the whole state into its abstract template (#20 item 2)
        raise AssertionError("a resume read the HF weights")
    from masa_jax.models import qwen
    monkeypatch.setattr(qwen, "from_pretrained", no_weights)
    resumed = train.train(config, str(tmp_path / "split"))
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        assert _comparable(a) == _comparable(b)
    lines = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert lines == [1, 2, 3, 4]


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tiny_model_dir, small_config, tmp_path, caplog):
    config = small_config(tiny_model_dir, "grpo", total_steps=3)
    train.train(config, str(tmp_path), stop_after=2)
    ckpt = tmp_path / "checkpoints" / "2"
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt / "state") for f in fs]
    for f in data_files:
        if os.sep + "d" + os.sep in f:
            with open(f, "r+b") as fh:
                fh.truncate(8)
    with caplog.at_level(logging.WARNING):
        history = train.train(config, str(tmp_path))
    assert any("2" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    # Resumed from step 1, so steps 2 and 3 were run again.
    assert [h["step"] for h in history] == [1, 2, 3]


class ScriptedPolicy:
    """A fake rollout policy: fixed meta outputs, correct worked solutions, budgets honoured like the
    sampler (finish reason "budget"). Records every prompt it was given."""

    def __init__(self, codec, meta_output):
        self.codec = codec
        self.meta_output = meta_output
        self.solution_prompts: list[str] = []
        self.solution_lengths: list[int] = []

    def __call__(self, prompt_ids, budgets, max_new_tokens, rng):
        Out = collections.namedtuple("Out", "tokens logprobs finish_reasons")
        tokens, logprobs, reasons = [], [], []
        for i, ids in enumerate(prompt_ids):
            text = self.codec.decode(ids)
            question = re.search(r"Compute [^.]*\.", text).group(0)
            if "pass_rate" in text:
                out = self.meta_output(question)
            else:
                self.solution_prompts.append(text)
                out = world.solve(question).text
            ids_out = self.codec.encode(out) + [self.codec.end_of_turn]
            limit = max_new_tokens if budgets is None else min(int(budgets[i]), max_new_tokens)
            reason = "eos"
            if len(ids_out) > limit:
                ids_out = ids_out[:limit]
                reason = "budget" if budgets is not None and int(budgets[i]) < max_new_tokens else "max_new_tokens"
            if "pass_rate" not in text:
                self.solution_lengths.append(len(ids_out))
            tokens.append(ids_out)
            logprobs.append(np.full(len(ids_out), -1.0, np.float32))
            reasons.append(reason)
        return Out(tokens, logprobs, reasons)


def test_gating_cutoff_and_hints_act_on_the_rollouts(tiny_model_dir, small_config, tmp_path):
    codec = load_codec(tiny_model_dir)

    def meta_output(question):
        # "Trivially easy" (pass 8/8) for one-operation questions, otherwise a 3-token length and a hint.
        easy = question.count("+") + question.count("-") + question.count("*") == 1
        rate = 8 if easy else 4
        return '<meta>ok</meta>\n{"math_notion": ["carry", "borrow"], "pass_rate": %d, "solution_length": 3}' % rate

    policy = ScriptedPolicy(codec, meta_output)
    config = small_config(tiny_model_dir, "masa_efficient", total_steps=3, **{
        "efficient.switch_step": 1, "data.train_files": ("toy:64:1,0,1,0,0",), "rollout.max_response_length": 64,
        "rollout.meta_max_new_tokens": 128})
    history = train.train(config, str(tmp_path), generate_fn=policy)
    before, after = history[0], history[1:]
    assert before["efficient/active"] == 0.0 and all(h["efficient/active"] == 1.0 for h in after)
    # Before the switch-over no hint is given; after it every solution prompt carries one.
    n_before = 2 * config.rollout.num_solutions
    assert not any("Hint:" in p for p in policy.solution_prompts[:n_before])
    assert all("Hint: the problem can be solved using these notions: carry, borrow." in p
               for p in policy.solution_prompts[n_before:])
    # Gated problems got no solution rollouts; the others were cut at ceil(2 * 3) = 6 tokens.
    gated = sum(h["gate/fraction"] * config.data.problems_per_step for h in after)
    rolled = sum(config.data.problems_per_step for _ in after) - gated
    assert len(policy.solution_prompts) - n_before == rolled * config.rollout.num_solutions
    assert gated > 0
    assert all(n <= 6 for n in policy.solution_lengths[n_before:])
    assert all(h["cutoff/fraction"] == 1.0 for h in after if h["gate/fraction"] < 1.0)
    assert all(h["acc/solution"] == 0.0 for h in after if h["gate/fraction"] < 1.0)  # cut rollouts score 0


def test_dapo_with_gating_counts_only_solution_groups_and_keeps_meta_sequences(tiny_model_dir, small_config, tmp_path):
    """Issue 11.4: a gated problem brings no solution group, so it must not count as a kept group (the
    batch would fill up with problems that train nothing); zero-variance solution groups keep their
    meta sequences."""
    codec = load_codec(tiny_model_dir)

    def meta_output(question):  # one-operation questions predicted 8/8 (gated after the switch)
        easy = question.count("+") + question.count("-") + question.count("*") == 1
        return ('<meta>ok</meta>\n{"math_notion": ["add"], "pass_rate": %d, "solution_length": 40}'
                % (8 if easy else 4))

    class MixedPolicy(ScriptedPolicy):  # every second solution rollout of a problem is wrong
        def __call__(self, prompt_ids, budgets, max_new_tokens, rng):
            out = super().__call__(prompt_ids, budgets, max_new_tokens, rng)
            if budgets is not None or max_new_tokens == config.rollout.max_response_length:
                for i in range(1, len(out.tokens), 2):
                    text = re.sub(r"\\boxed\{[^}]*\}", r"\\boxed{x}", codec.decode(out.tokens[i]))
                    out.tokens[i] = codec.encode(text) + [codec.end_of_turn]
            return out

    config = small_config(tiny_model_dir, "masa_efficient", total_steps=4, **{
        "efficient.switch_step": 1, "data.train_files": ("toy:64:1,0,0,1,0",), "rollout.max_response_length": 128,
        "rollout.meta_max_new_tokens": 128, "dapo.dynamic_sampling": True, "dapo.max_rounds": 4})
    history = train.train(config, str(tmp_path), generate_fn=MixedPolicy(codec, meta_output))
    after = history[1:]
    assert any(h["gate/fraction"] > 0 for h in after)
    for h in after:
        # Every problem rolled out here has a mixed group: with no gated problem in the first round no
        # extra round is needed; a gated one needs at least one more round to fill the batch.
        assert h["dapo/kept_groups"] == config.data.problems_per_step
        assert (h["dapo/rounds"] >= 1) == (h["gate/fraction"] > 0)
        assert h["actor/batch_rows"] >= config.data.problems_per_step * config.rollout.num_solutions


def test_each_host_samples_with_its_own_key(tiny_model_dir, small_config, tmp_path):
    """Issue 11.2: the step key is the same on every host; the rollout key must fold in the process
    index, or request r on host 0 and on host 1 draw the same uniforms."""
    import jax

    step_key = jax.random.fold_in(jax.random.key(0), 0)
    draws = [np.asarray(jax.random.uniform(train.sampling_key(step_key, i), (64,))) for i in range(2)]
    assert not np.allclose(draws[0], draws[1])
    np.testing.assert_array_equal(draws[0], jax.random.uniform(train.sampling_key(step_key, 0), (64,)))
    # The trainer hands the rollout this host's key (split there into the meta and solution keys).
    codec = load_codec(tiny_model_dir)
    keys = []
    policy = ScriptedPolicy(codec, lambda q: '<meta>ok</meta>{"pass_rate": 4}')

    def recording(prompt_ids, budgets, max_new_tokens, rng):
        keys.append(jax.random.key_data(rng))
        return policy(prompt_ids, budgets, max_new_tokens, rng)

    config = small_config(tiny_model_dir, "masa", total_steps=1)
    train.train(config, str(tmp_path), generate_fn=recording)
    meta_key = jax.random.split(train.sampling_key(jax.random.fold_in(jax.random.key(config.seed), 0), 0))[0]
    np.testing.assert_array_equal(keys[0], jax.random.key_data(meta_key))


def test_held_out_evaluation_before_during_and_after_training(tiny_model_dir, small_config, tmp_path, capsys):
    """eval.files: accuracy before the first step, every eval.every steps and after the last; in the
    step's metrics, eval.jsonl (with the training wall-clock so far) and the closing table."""
    codec = load_codec(tiny_model_dir)

    hard = [p.question for p in world.heldout(10) if p.difficulty > 2]

    def policy(prompt_ids, budgets, max_new_tokens, rng):  # fails the held-out problems above level 2
        out = ScriptedPolicy(codec, lambda q: '<meta>ok</meta>{"pass_rate": 4}')(prompt_ids, budgets,
                                                                                  max_new_tokens, rng)
        for i, ids in enumerate(prompt_ids):
            text = codec.decode(ids)
            if "pass_rate" not in text and any(q in text for q in hard):
                out.tokens[i] = codec.encode("\\boxed{x}") + [codec.end_of_turn]
        return out

    config = small_config(tiny_model_dir, "masa", total_steps=3, **{
        "eval.files": ("toy-heldout:10",), "eval.every": 2, "eval.num_samples": 2,
        "rollout.max_response_length": 128, "rollout.meta_max_new_tokens": 64})
    history = train.train(config, str(tmp_path), generate_fn=policy)
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:  # heldout(10) cycles levels 1..5: levels 1, 2 solved -> 4 of 10 problems
        assert e["eval/accuracy"] == 0.4
        assert [e[f"eval/accuracy_level_{lv}"] for lv in range(1, 6)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert evals[0]["train_time_s"] == 0.0 < evals[1]["train_time_s"] < evals[2]["train_time_s"]
    assert [("eval/accuracy" in h) for h in history] == [False, True, True]
    assert "held-out" in capsys.readouterr().out


def test_dry_run_reports_the_8b_pod_config_without_allocating():
    out = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/qwen8b.py", "--dry_run"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "8.19 B params" in out.stdout
    assert "'fsdp': 8, 'tensor': 4" in out.stdout
    assert re.search(r"kv_cache\s+\d+\.\d+ GiB", out.stdout)
    assert ": fits" in out.stdout


def test_unknown_config_field_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/qwen8b.py", "--dry_run",
                          "--config.rl.lrr=2e-6"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "lrr" in out.stderr


def test_logs_reach_tensorboard_wandb_and_samples(tiny_model_dir, small_config, tmp_path, monkeypatch):
    """Issue 24.3: the step-0 held-out accuracy is on TensorBoard / W&B too (not only eval.jsonl), the W&B
    run and TensorBoard's hparams carry the config, and each step logs log.num_samples meta and solution
    generations with their rewards (samples.jsonl, TensorBoard text, W&B tables)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_metrics import _read_tb_events, _read_tb_scalars

    wandb_calls = {"init": [], "log": []}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def init(**kwargs):
        wandb_calls["init"].append(kwargs)
        return types.SimpleNamespace(log=lambda data, step: wandb_calls["log"].append((step, data)),
                                     finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Table=Table))
    codec = load_codec(tiny_model_dir)
    meta_text = '<meta>ok</meta>{"pass_rate": 4}'
    config = small_config(tiny_model_dir, "masa", total_steps=2, **{
        "eval.files": ("toy-heldout:4",), "eval.num_samples": 1, "log.num_samples": 3, "log.wandb": True,
        "rl.lr": 3e-4, "rollout.max_response_length": 128, "rollout.meta_max_new_tokens": 64})
    train.train(config, str(tmp_path), generate_fn=ScriptedPolicy(codec, lambda q: meta_text))
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 2]
    assert scalars["eval/accuracy"][0][1] == pytest.approx(evals[0]["eval/accuracy"])
    assert wandb_calls["log"][0] == (0, {k: v for k, v in evals[0].items() if k not in ("step", "train_time_s")})
    assert wandb_calls["init"][0]["config"]["rl"]["lr"] == 3e-4
    assert wandb_calls["init"][0]["config"]["log"]["num_samples"] == 3
    hp = [v for e in _read_tb_events(tmp_path / "tb") for v in e.summary.value
          if v.tag == "_hparams_/session_start_info"]
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    start = HParamsPluginData.FromString(hp[0].metadata.plugin_data.content).session_start_info.hparams
    assert start["rl.lr"].number_value == pytest.approx(3e-4) and start["algorithm"].string_value == "masa"
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [(r["step"], r["path"]) for r in samples] == [(s, p) for s in (1, 2) for p in ["meta"] * 3 + ["solution"] * 3]
    for r in samples:
        assert r["question"].startswith("Compute")
        if r["path"] == "meta":
            assert r["text"] == meta_text and r["pred_pass_rate"] == 4 / config.meta.k and 0 <= r["reward"] <= 1
        else:  # the scripted policy solves every problem: reward 1, the world's worked solution
            assert r["text"] == world.solve(re.search(r"Compute [^.]*\.", r["question"]).group(0)).text
            assert r["reward"] == 1.0 and r["length"] == len(codec.encode(r["text"]))
    tables = [(step, key, data[key]) for step, data in wandb_calls["log"] for key in data if key.startswith("samples/")]
    assert [(step, key, len(t.data)) for step, key, t in tables] == [
        (1, "samples/meta", 3), (1, "samples/solution", 3), (2, "samples/meta", 3), (2, "samples/solution", 3)]
    texts = {(e.step, v.tag) for e in _read_tb_events(tmp_path / "tb") for v in e.summary.value
             if v.metadata.plugin_data.plugin_name == "text"}
    assert texts == {(s, f"samples/{p}/text_summary") for s in (1, 2) for p in ("meta", "solution")}
