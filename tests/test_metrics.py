"""Tests for masa_jax.metrics: JSONL log and resume, TensorBoard / W&B, console, figures, stats."""

import io
import json
import logging
import math
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax import metrics
from masa_jax.metrics import MetricsWriter, ProgressBar, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step_metrics(step: int) -> dict:
    return {
        "reward/solution_mean": np.float32(0.25 + 0.05 * step),
        "acc/solution": jnp.float32(0.2 + 0.05 * step),
        "reward/meta_total": 0.4 + 0.02 * step,
        "reward/meta_length": 0.1 * (step % 3),
        "reward/meta_difficulty": 0.5,
        "reward/meta_notion": np.float64(0.3),
        "gate/fraction": 0.0 if step < 3 else 0.35,
        "throughput/tokens_per_s": np.int64(1000 * step),
        "corr/pred_pass": float("nan") if step == 2 else 0.5,
    }


# ---------------------------------------------------------------------------------- JSON values


def test_to_json_value_converts_scalars_and_nulls_non_finite():
    record = metrics.to_json_value({
        "np32": np.float32(0.5), "jax": jnp.float32(2.0), "bf16": jnp.bfloat16(1.5),
        "int": np.int64(7), "bool": np.bool_(True), "nan": float("nan"), "inf": np.float32(np.inf),
        "ninf": -math.inf, "array": np.array([1.0, np.nan, 3.0]), "nested": {"t": (1, np.int32(2))},
        "text": "ok", "none": None, "object": object,
    })
    assert record["np32"] == 0.5 and record["jax"] == 2.0 and record["bf16"] == 1.5
    assert record["int"] == 7 and type(record["int"]) is int and record["bool"] is True
    assert record["nan"] is None and record["inf"] is None and record["ninf"] is None
    assert record["array"] == [1.0, None, 3.0] and record["nested"] == {"t": [1, 2]}
    assert record["text"] == "ok" and record["none"] is None and record["object"] == str(object)
    json.dumps(record, allow_nan=False)  # strictly valid JSON


# ---------------------------------------------------------------------------------- the writer


def _read_tb_events(tb_dir):
    """Minimal TFRecord reader: every Event of the tensorboardX files in ``tb_dir``, in order."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(tb_dir.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def _read_tb_scalars(tb_dir):
    """{tag: [(step, value)]} from the tensorboardX files in ``tb_dir``."""
    scalars = {}
    for event in _read_tb_events(tb_dir):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, is_primary=True) as writer:
        for step in (1, 2, 3):
            writer.write(step, _step_metrics(step))
    history = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3]
    assert history[1]["corr/pred_pass"] is None  # NaN -> null, the line is still written
    assert history[0]["throughput/tokens_per_s"] == 1000
    assert history[2]["acc/solution"] == pytest.approx(0.35)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["gate/fraction"]] == [1, 2, 3]
    assert scalars["reward/meta_difficulty"][0][1] == pytest.approx(0.5)
    assert [s for s, _ in scalars["corr/pred_pass"]] == [1, 3]  # the null is not plotted


def test_resumed_run_file_equals_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with MetricsWriter(straight, use_tensorboard=False) as writer:
        for step in range(1, 7):
            writer.write(step, _step_metrics(step))
    # The crashed run logged up to step 5, died while writing step 6, last checkpoint at step 3.
    with MetricsWriter(crashed, use_tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write(step, {**_step_metrics(step), "stale": True})
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/sol')
    with MetricsWriter(crashed, use_tensorboard=True) as writer:
        assert len(read_jsonl(writer.path)) == 5  # untouched until the trainer knows the step
        writer.truncate_after(3)  # what train.py calls after restoring the step-3 checkpoint
        assert [r["step"] for r in read_jsonl(writer.path)] == [1, 2, 3]
        for step in range(4, 7):
            writer.write(step, _step_metrics(step))
    resumed = read_jsonl(crashed / "metrics.jsonl")
    assert all(r.pop("stale") for r in resumed[:3])
    assert resumed == read_jsonl(straight / "metrics.jsonl")
    # TensorBoard is told to drop the interrupted run's events from step 4 on.
    starts = [e.step for e in _read_tb_events(crashed / "tb") if e.HasField("session_log")]
    assert 4 in starts


def test_resume_step_argument_truncates_at_construction(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False) as writer:
        for step in range(1, 5):
            writer.write(step, {"a": float(step)})
    with MetricsWriter(tmp_path, use_tensorboard=False, resume_step=2) as writer:
        assert [r["step"] for r in read_jsonl(writer.path)] == [1, 2]


def test_fresh_run_empties_an_old_file_and_non_primary_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", use_tensorboard=False) as writer:
        writer.write(1, {"a": 1.0})
    with MetricsWriter(tmp_path / "run", use_tensorboard=False) as writer:
        writer.truncate_after(0)  # no checkpoint: a fresh run starts a fresh log
        assert read_jsonl(writer.path) == []
    other = MetricsWriter(tmp_path / "other", use_tensorboard=True, is_primary=False)
    assert other.write(4, {"a": np.float32(2.0)}) == {"step": 4, "a": 2.0}
    other.close()
    assert not (tmp_path / "other").exists()


def test_read_jsonl_skips_a_broken_line(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"\n\n{"step": 3, "a": null}\n')
    with caplog.at_level(logging.WARNING, logger="masa_jax.metrics"):
        assert read_jsonl(path) == [{"step": 1, "a": 1}, {"step": 3, "a": None}]
    assert "m.jsonl:2" in caplog.text
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even if installed
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsWriter(tmp_path, use_tensorboard=False, use_wandb=True, wandb_project="p")


def test_wandb_logs_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for step in (1, 2):
        with MetricsWriter(tmp_path, use_tensorboard=False, use_wandb=True, wandb_project="masa",
                           resume_step=step - 1, wandb_config={"lr": 1e-6}) as writer:
            writer.write(step, {"a": np.float32(0.5), "bad": float("nan"), "note": "x"})
    first, second = calls["init"]
    assert first["project"] == "masa" and first["config"] == {"lr": 1e-6}
    assert first["id"] == second["id"] and second["resume"] == "allow"
    assert calls["log"] == [(1, {"a": 0.5}), (2, {"a": 0.5})] and calls["finish"] == 2


# ---------------------------------------------------------------------------------- console


def test_progress_bar_shows_the_headline_metrics():
    text = metrics.format_progress(_step_metrics(3))
    assert text == "reward=0.400 acc=35.0% meta=0.460 gated=35% tok/s=3,000"
    assert metrics.format_progress({"gate/fraction": None, "other": 1.0}) == ""
    perf = {"perf/rollout_tokens_per_s": 1234.5, "perf/update_tokens_per_s": 9000.0, "perf/mfu": 0.4213}
    assert metrics.format_progress(perf) == "rollout tok/s=1,234 update tok/s=9,000 mfu=42.1%"
    out = io.StringIO()
    with ProgressBar(total_steps=10, initial=2, file=out) as bar:
        bar.update(3, _step_metrics(3))
        bar.update(5, {"reward/solution_mean": 0.75})
    # tqdm throttles redraws, so only the last update is certain to be on screen.
    assert "5/10" in out.getvalue() and "reward=0.750" in out.getvalue()


# ---------------------------------------------------------------------------------- statistics


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def test_figures_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(1)
    true_start, true_end = rng.integers(0, 17, 80) / 16, rng.integers(0, 17, 60) / 16
    pred_start = rng.integers(0, 9, 80) / 8
    pred_end = np.clip(true_end + rng.normal(0, 0.1, 60), 0, 1)
    one = metrics.plot_calibration(pred_start, true_start, tmp_path / "cal1.png", "start only")
    two = metrics.plot_calibration((pred_start, pred_end), (true_start, true_end),
                                   tmp_path / "figs" / "cal2.png", "MASA calibration")
    (w1, _), (w2, _) = _assert_png(one), _assert_png(two)
    assert w2 > 1.5 * w1  # two panels side by side
    lengths = metrics.plot_calibration([900.0, 1500.0, 3000.0], [1000.0, 1400.0, np.nan],
                                       tmp_path / "len.png", lims=None,
                                       xlabel="predicted length", ylabel="actual length")
    _assert_png(lengths)
    with pytest.raises(ValueError):
        metrics.plot_calibration([0.1, 0.2], [0.1], tmp_path / "bad.png")

    history = [{"step": s, **metrics.to_json_value(_step_metrics(s))} for s in range(1, 9)]
    _assert_png(metrics.plot_meta_rewards(history, tmp_path / "meta.png"))
    _assert_png(metrics.plot_gating(history, tmp_path / "gate.png"))
    no_meta = [{"step": 1, "acc/solution": 0.5}]
    assert metrics.plot_meta_rewards(no_meta, tmp_path / "no.png") is None
    assert not (tmp_path / "no.png").exists()

    steps = np.arange(0, 100, 10)
    _assert_png(metrics.plot_curves(
        {"MASA": (steps, 0.4 + steps / 500, np.full(10, 0.02)), "GRPO": (steps, 0.4 + steps / 600),
         "GRPO (tokens)": (steps, 0.41 + steps / 700, None)},
        "step", "pass@1", tmp_path / "curves.png", "accuracy vs step"))
    with pytest.raises(ValueError):
        metrics.plot_curves({"x": ([1, 2], [1])}, "a", "b", tmp_path / "bad.png")


def test_summary_table_first_vs_last():
    history = [{"step": s, **metrics.to_json_value(_step_metrics(s))} for s in range(1, 6)]
    history[0]["reward/meta_notion"] = None
    table = metrics.summary_table(history)
    lines = table.splitlines()
    assert "first (step 1)" in lines[0] and "last (step 5)" in lines[0]
    reward = next(line for line in lines if line.startswith("reward/solution_mean"))
    assert reward.split()[1:] == ["0.3", "0.5", "+0.2"]
    notion = next(line for line in lines if line.startswith("reward/meta_notion"))
    assert "@2" in notion  # first non-null value came from step 2
    assert "corr/pred_pass" not in table  # only the key metrics by default
    assert metrics.summary_table(history, keys=["corr/pred_pass"]).count("\n") == 2
    assert metrics.summary_table([]) == "(no metrics logged)"
    # The trainer's in-memory history (numpy / jax scalars, NaN) gives the same table.
    raw = [{"step": s, **_step_metrics(s)} for s in range(1, 6)]
    raw[0]["reward/meta_notion"] = float("nan")
    assert metrics.summary_table(raw) == table


def test_summary_table_window_means():
    history = [{"step": s, **metrics.to_json_value(_step_metrics(s))} for s in range(1, 6)]
    history[0]["reward/meta_notion"] = None
    lines = metrics.summary_table(history, window=2).splitlines()
    assert "first 2 steps (1-2)" in lines[0] and "last 2 steps (4-5)" in lines[0]
    row = lambda key: next(line for line in lines if line.startswith(key + " ")).split()[1:]
    assert row("reward/solution_mean") == ["0.325", "0.475", "+0.15"]  # (0.3+0.35)/2, (0.45+0.5)/2
    assert row("gate/fraction") == ["0", "0.35", "+0.35"]
    assert row("reward/meta_notion") == ["0.3", "0.3", "+0"]  # the null at step 1 is skipped
    with pytest.raises(ValueError):
        metrics.summary_table(history, window=0)


# ---------------------------------------------------------------------------------- issue 24.3: logs a researcher reads


def _sample(path, step_reward, text):
    return {"path": path, "uid": "u1", "text": text, "reward": step_reward}


def test_step0_scalars_hparams_and_samples_reach_tensorboard(tmp_path):
    config = {"algorithm": "masa", "rl": {"lr": 2e-6, "clip": (0.2, 0.28)}, "log": {"wandb": False}}
    with MetricsWriter(tmp_path, is_primary=True, hparams=config) as writer:
        writer.truncate_after(0)  # as the trainer does on a fresh run
        writer.write_scalars(0, {"eval/accuracy": np.float32(0.25), "time/eval_s": 3.0, "note": "x"})
        writer.write(1, {"reward/solution_mean": 0.5, "eval/accuracy": 0.5})
        writer.write_samples(1, [_sample("meta", 0.75, "<meta>think</meta> | {\"pass_rate\": 4}"),
                                 _sample("solution", 1.0, "2+2=4\n\\boxed{4}")])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/solution_mean": 0.5, "eval/accuracy": 0.5}]
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert scalars["eval/accuracy"] == [(0, 0.25), (1, 0.5)] and "note" not in scalars
    events = _read_tb_events(tmp_path / "tb")
    hp = [v for e in events for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]
    assert {v.tag for v in hp} == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    data = {v.tag: HParamsPluginData.FromString(v.metadata.plugin_data.content) for v in hp}
    start = data["_hparams_/session_start_info"].session_start_info.hparams
    assert start["rl.lr"].number_value == pytest.approx(2e-6) and start["algorithm"].string_value == "masa"
    assert start["rl.clip"].string_value == "(0.2, 0.28)" and start["log.wandb"].bool_value is False
    metric_tags = [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos]
    assert metric_tags == list(metrics.HPARAM_METRICS)
    # The hparams live in the run's own directory (tb/), next to its scalars, not in a sub-run.
    assert all(p.is_file() for p in (tmp_path / "tb").iterdir())
    # Samples: samples.jsonl and one Markdown table per path in TensorBoard's text tab.
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 1, **_sample("meta", 0.75, "<meta>think</meta> | {\"pass_rate\": 4}")},
        {"step": 1, **_sample("solution", 1.0, "2+2=4\n\\boxed{4}")}]
    texts = {v.tag.removesuffix("/text_summary"): (e.step, v.tensor.string_val[0].decode()) for e in events
             for v in e.summary.value
             if v.metadata.plugin_data.plugin_name == "text"}
    assert texts["samples/meta"] == (1, "| uid | text | reward |\n| --- | --- | --- |\n"
                                        "| u1 | &lt;meta&gt;think&lt;/meta&gt; \\| {\"pass_rate\": 4} | 0.75 |")
    assert texts["samples/solution"] == (1, "| uid | text | reward |\n| --- | --- | --- |\n"
                                            "| u1 | 2+2=4<br>\\\\boxed{4} | 1.0 |")


def test_samples_go_to_a_wandb_table_and_resume_drops_later_ones(tmp_path, monkeypatch):
    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run, Table=Table))
    with MetricsWriter(tmp_path, use_tensorboard=False, use_wandb=True) as writer:
        writer.write_scalars(0, {"eval/accuracy": 0.125})
        for step in (1, 2, 3):
            writer.write_samples(step, [{"path": "meta", "text": f"m{step}", "reward": 0.5,
                                         "pred_notions": ["carry"]}])
        writer.write_samples(4, [])  # nothing to log: no file line, no W&B call
    assert logged[0] == (0, {"eval/accuracy": 0.125})
    step, data = logged[1]
    table = data["samples/meta"]
    assert step == 1 and table.columns == ["text", "reward", "pred_notions"]
    assert table.data == [["m1", 0.5, '["carry"]']] and len(logged) == 4
    with MetricsWriter(tmp_path, use_tensorboard=False) as writer:
        writer.truncate_after(2)  # resumed from the step-2 checkpoint
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2]


def test_log_lines_are_written_above_the_progress_bar(capsys):
    """A console log line while the bar is open goes through tqdm.write: the bar line is cleared first and
    redrawn after, instead of the line being appended to the bar (which then repeats on every line)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # sys.stderr is capsys's here
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root.addHandler(handler)
    log = logging.getLogger("masa_jax.test_bar")
    log.setLevel(logging.INFO)
    try:
        with ProgressBar(total_steps=4) as bar:
            bar.update(1, {"reward/solution_mean": 0.5})
            log.info("held-out accuracy at step 1: 0.5")
            assert root.handlers[-1] is not handler  # replaced by tqdm's handler while the bar is open
        assert handler in root.handlers  # given back
        log.info("after the bar")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    before, line, after = err.partition("LOG held-out accuracy at step 1: 0.5\n")
    assert line and before.endswith("\r")  # the bar's line was cleared before the log line
    assert "1/4" in after  # and drawn again below it
    assert err.endswith("LOG after the bar\n")


def test_absl_log_lines_go_through_tqdm_while_the_bar_is_open(monkeypatch):
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    original = handler.python_handler.stream
    with ProgressBar(total_steps=2):
        from tqdm.contrib import DummyTqdmFile
        assert isinstance(handler.python_handler.stream, DummyTqdmFile)
        assert [type(h) for h in root.handlers] == [type(handler)]  # no second handler next to absl's
    assert handler.python_handler.stream is original


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_meta_reward_and_gating_figures_mark_the_switch_and_show_flat_parts():
    history = [{"step": s, "reward/meta_total": 0.2 + 0.05 * s, "reward/meta_length": 0.0,
                "reward/meta_difficulty": 0.5, "reward/meta_notion": 0.1 * s, "efficient/active": float(s >= 4),
                **({"gate/fraction": 0.25} if s >= 4 else {"gate/would_gate_fraction": 0.5})} for s in range(1, 7)]
    fig = metrics.meta_rewards_figure(history)
    (ax,) = fig.axes
    lines = _lines(ax)
    assert set(lines) == {"reward/meta_total", "reward/meta_length (0 throughout)", "reward/meta_difficulty",
                          "reward/meta_notion", "switch-over (step 4)"}
    assert list(lines["switch-over (step 4)"].get_xdata()) == [4, 4]
    assert list(lines["reward/meta_length (0 throughout)"].get_ydata()) == [0.0] * 6
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 1  # a part at 0 (or 1) is a line above the axis
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 6]
    assert ticks and all(float(t).is_integer() for t in ticks)
    fig = metrics.gating_figure(history)
    (ax,) = fig.axes
    lines = _lines(ax)
    assert list(lines["gate/would_gate_fraction (not applied)"].get_xdata()) == [1, 2, 3]
    assert lines["gate/would_gate_fraction (not applied)"].get_linestyle() == "--"
    assert list(lines["gate/fraction"].get_xdata()) == [4, 5, 6]
    assert "switch-over (step 4)" in lines
    # Without a switch-over (MASA) there is no marker; an explicit one wins over the history.
    masa = [{k: v for k, v in r.items() if k != "efficient/active"} for r in history]
    assert metrics.switch_step(masa) is None
    assert not any("switch" in label for label in _lines(metrics.meta_rewards_figure(masa).axes[0]))
    assert "switch-over (step 2)" in _lines(metrics.meta_rewards_figure(history, switch=2).axes[0])
    assert metrics.gating_figure([{"step": 1, "acc/solution": 0.5}]) is None
