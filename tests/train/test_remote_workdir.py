"""A run, its resume and `evaluate` with everything on gs:// (workdir, model and tokenizer dir, training,
held-out and benchmark files): every file goes through epath, nothing lands in a local ./gs:/ folder."""
from __future__ import annotations

import json
import os
import types

import pytest
from etils import epath

from masa_jax import evaluate, train
from masa_jax.toy import world


class _Flags(types.SimpleNamespace):
    """The parsed flags of `python -m masa_jax.evaluate`; an unset flag reads None (its default)."""

    def __getattr__(self, name):
        return None


def _write_jsonl(path: str, problems) -> None:
    epath.Path(path).write_text("".join(json.dumps({"problem": p.question, "answer": p.answer}) + "\n"
                                        for p in problems))


@pytest.mark.slow  # train, resume and evaluate end to end
def test_train_resume_and_evaluate_on_gcs(tiny_model_dir, small_config, fake_gcs, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a path that bypasses epath would turn up here as ./gs:/...
    monkeypatch.setenv("MASA_JAX_CACHE", str(tmp_path / "cache"))  # local copies of remote model dirs
    model = epath.Path("gs://models/tiny")
    for name in os.listdir(tiny_model_dir):
        (model / name).write_bytes(epath.Path(tiny_model_dir, name).read_bytes())
    _write_jsonl("gs://data/train.jsonl", world.load_spec("toy:16"))
    _write_jsonl("gs://data/heldout.jsonl", world.heldout(2, seed=3))
    _write_jsonl("gs://data/bench.jsonl", world.heldout(3, seed=7))
    config = small_config(str(model), "masa_efficient", total_steps=2, **{
        "data.train_files": ("gs://data/train.jsonl",), "eval.files": ("gs://data/heldout.jsonl",),
        "eval.num_samples": 1, "log.peak_flops_per_device": 1e12})
    workdir = "gs://runs/run1"

    assert [h["step"] for h in train.train(config, workdir, stop_after=1)] == [1]
    history = train.train(config, workdir)  # resumes from the checkpoint at step 1
    assert [h["step"] for h in history] == [1, 2]
    for h in history:  # throughput (masa_jax.perf) in every step's metrics
        assert h["perf/rollout_tokens_per_s"] > 0 and h["perf/update_tokens_per_s"] > 0 and 0 < h["perf/mfu"] < 1

    run = epath.Path(workdir)
    assert json.loads((run / "config.json").read_text())["algorithm"] == "masa_efficient"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["step"] for line in (run / "calibration.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 2]
    for fig in ("calibration.png", "meta_rewards.png", "gating.png"):
        assert len((run / "figures" / fig).read_bytes()) > 1000, fig
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert {"1", "2"} <= {p.name for p in (run / "checkpoints").iterdir()}

    results = evaluate.run_evaluation(_Flags(config=config, checkpoint=workdir, data="gs://data/bench.jsonl",
                                             n=2, k="1,2", max_new_tokens=8))
    assert results["bench.jsonl"]["problems"] == 3
    assert json.loads((run / "eval.json").read_text())["bench.jsonl"]["problems"] == 3
    assert (run / "eval.md").exists()

    assert not os.listdir(cwd), os.listdir(cwd)
    assert (fake_gcs / "runs" / "run1" / "config.json").is_file()  # where the fake bucket keeps it
