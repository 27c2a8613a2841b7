"""The paper's evaluation protocol (`masa_jax.evaluation.paper`, `python -m masa_jax.evaluate`): settings,
benchmark formats, scoring, and the CLI with --meta on the shipped toy base model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from masa_jax import config as config_lib
from masa_jax import errors
from masa_jax.evaluation import paper
from masa_jax.toy import defaults, world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _eval_paper_config(arg=None):
    spec = importlib.util.spec_from_file_location("eval_paper_cfg", os.path.join(REPO, "configs", "eval_paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.resolve(module.get_config(arg) if arg else module.get_config())


def test_paper_defaults_and_precedence():
    """Paper values by default (qwen8b base); config.evaluate over them; a given flag over both."""
    c = _eval_paper_config()
    assert c.model.preset == "qwen3-8b"
    s = paper.resolve_settings(c)
    assert (s.n, s.ks, s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (32, (1, 8, 32), 0.6, 1.0, 0, 16384)
    assert s.num_meta == c.rollout.num_meta and not s.meta
    # A plain run config without an evaluate section gets the paper's values too.
    assert paper.resolve_settings(config_lib.resolve(config_lib.base_config())).temperature == 0.6
    with c.unlocked():
        c.evaluate.n, c.evaluate.temperature = 4, 1.0
    s = paper.resolve_settings(c, {"n": 2, "temperature": None, "ks": "1,2", "data": "a.jsonl,b.parquet"})
    assert (s.n, s.temperature, s.ks, s.data) == (2, 1.0, (1, 2), ("a.jsonl", "b.parquet"))
    with pytest.raises(errors.UserError, match="top_p"):
        paper.resolve_settings(c, {"top_p": 0.0})
    tiny = _eval_paper_config("tiny")
    assert tiny.prompts.solution_template == defaults.SOLUTION_TEMPLATE and tiny.evaluate.n == 32


def test_score_pass_at_k_and_average_by_hand():
    correct = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    lengths = np.array([[10, 20, 30, 8], [8, 8, 8, 8], [1, 2, 3, 4]])
    r = paper.score(correct, lengths, (1, 2, 4, 8), max_new_tokens=8)
    assert r["problems"] == 3 and r["n"] == 4
    assert r["pass@1"] == pytest.approx(6 / 12)
    # pass@2 per problem: 1 - C(n-c, 2) / C(4, 2): c=2 -> 1 - 1/6, c=0 -> 0, c=4 -> 1.
    assert r["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + 1) / 3)
    assert r["pass@4"] == pytest.approx(2 / 3) and "pass@8" not in r  # k > n is not estimable
    assert r["mean_length"] == pytest.approx(lengths.mean())
    assert r["at_token_limit"] == pytest.approx(8 / 12)  # lengths >= 8
    avg = paper.average({"a": {"problems": 3, "n": 4, "pass@1": 0.5, "pass@2": 0.6},
                         "b": {"problems": 5, "n": 4, "pass@1": 0.1, "pass@2": 0.2}})
    assert avg == {"benchmarks": 2, "problems": 8, "pass@1": pytest.approx(0.3), "pass@2": pytest.approx(0.4)}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_benchmark_formats(tmp_path):
    """verl parquet, flat parquet (HF's AIME / MATH-500), JSONL with problem/answer or question/answer, numeric
    answers (AMC23's 27.0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    verl = paper.load_benchmark(os.path.join(REPO, "tests", "data", "math_sample.parquet"))
    assert verl and all(p.question and p.answer for p in verl)
    flat = tmp_path / "aime24.parquet"
    pq.write_table(pa.table({"id": [60, 61], "problem": ["Find 1+1.", "Find 2+2."], "answer": ["2", "4"],
                             "solution": ["1+1=2", "2+2=4"], "year": [2024, 2024]}), flat)
    got = paper.load_benchmark(str(flat))
    assert [(p.uid, p.question, p.answer) for p in got] == [("aime24:60", "Find 1+1.", "2"), ("aime24:61", "Find 2+2.", "4")]
    a = paper.load_benchmark(_write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is $3^2$?", "answer": "9", "level": 2, "unique_id": "test/x.json"}]))
    assert (a[0].question, a[0].answer, a[0].difficulty) == ("What is $3^2$?", "9", 2)
    b = paper.load_benchmark(_write_jsonl(tmp_path / "amc23.jsonl", [{"question": "Compute 3*9.", "answer": 27.0}]))
    assert (b[0].question, b[0].answer) == ("Compute 3*9.", "27.0")


def test_benchmark_errors_name_file_row_and_field(tmp_path):
    bad = _write_jsonl(tmp_path / "minerva.jsonl", [{"problem": "1+1", "answer": "2"}, {"prompt": "x", "solution": "y"}])
    with pytest.raises(errors.UserError, match=r"minerva.jsonl row 1: no problem text: .*`problem` or `question`.*"
                                               r"its fields: prompt, solution"):
        paper.load_benchmark(bad)
    no_answer = _write_jsonl(tmp_path / "olympiad.jsonl", [{"question": "1+1", "final_answer": ["2"]}])
    with pytest.raises(errors.UserError, match=r"olympiad.jsonl row 0: no `answer` field.*final_answer"):
        paper.load_benchmark(no_answer)
    with pytest.raises(errors.UserError, match="does not exist"):
        paper.load_benchmark(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(errors.UserError, match="expected a .parquet"):
        paper.load_benchmark(str(tmp_path / "x.csv"))


@pytest.mark.slow  # the CLI in a subprocess
def test_evaluate_cli_paper_protocol_with_meta_on_the_toy_model(tmp_path):
    """`python -m masa_jax.evaluate --config=configs/eval_paper.py:tiny --meta` on the shipped toy base model and
    two small local files (problem/answer and question/answer): JSON + Markdown tables with the average,
    calibration numbers consistent with the per-problem file, the Figure-2 PNGs."""
    heldout = list(world.heldout(6, seed=11))
    a = _write_jsonl(tmp_path / "toy_a.jsonl", [{"problem": p.question, "answer": p.answer} for p in heldout[:3]])
    b = _write_jsonl(tmp_path / "toy_b.jsonl", [{"question": p.question, "answer": p.answer} for p in heldout[3:]])
    out = tmp_path / "eval.json"
    res = subprocess.run(
        [sys.executable, "-m", "masa_jax.evaluate", "--config=configs/eval_paper.py:tiny",
         f"--checkpoint={defaults.BASE_MODEL_DIR}", f"--data={a},{b}", "--config.evaluate.n=4", "--k=1,2,4",
         "--max_new_tokens=64", "--meta", "--num_meta=4", f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == ["toy_a.jsonl", "toy_b.jsonl", "average", "settings"]
    s = results["settings"]
    assert (s["n"], s["temperature"], s["top_p"], s["max_new_tokens"], s["meta"], s["num_meta"]) == \
        (4, 0.6, 1.0, 64, True, 4)
    for name in ("toy_a.jsonl", "toy_b.jsonl"):
        r = results[name]
        assert r["problems"] == 3 and r["n"] == 4 and 0 <= r["pass@1"] <= r["pass@2"] <= r["pass@4"] <= 1
        assert r["meta"]["problems"] == 3 and r["meta"]["num_meta"] == 4
    avg = results["average"]
    assert avg["problems"] == 6 and avg["pass@1"] == pytest.approx(
        (results["toy_a.jsonl"]["pass@1"] + results["toy_b.jsonl"]["pass@1"]) / 2)
    # The pooled meta numbers, recomputed from the per-problem file.
    rows = [json.loads(line) for line in (tmp_path / "eval_meta.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in rows] == ["toy_a.jsonl"] * 3 + ["toy_b.jsonl"] * 3
    m = avg["meta"]
    pairs = [(r["pred_pass"], r["true_pass"]) for r in rows if r["pred_pass"] is not None]
    assert m["pass_problems"] == len(pairs)
    if pairs:
        assert m["pass_mae"] == pytest.approx(np.mean([abs(p - t) for p, t in pairs]))
    assert m["gated"] == sum(r["gated"] for r in rows)
    assert m["parse_rate_pass"] > 0.5, "the toy base model speaks the meta format"
    # Markdown: the accuracy table (a row per file and the average) and the meta table.
    md = (tmp_path / "eval.md").read_text()
    for needle in ("| toy_a.jsonl | 3 |", "| toy_b.jsonl | 3 |", "| **average** | 6 |", "## Meta-awareness",
                   "temperature 0.6, top-p 1,", "pass@4"):
        assert needle in md, needle
    assert (tmp_path / "eval_calibration.png").stat().st_size > 0
    assert "average" in res.stdout and "pass-rate MAE" in res.stdout


def test_evaluate_cli_stops_on_a_benchmark_without_the_fields(tmp_path):
    """One line on stderr naming the file, the row and the missing field, before the model is loaded."""
    bad = _write_jsonl(tmp_path / "aime25.jsonl", [{"prompt": "Find x.", "target_answer": "3"}])
    res = subprocess.run([sys.executable, "-m", "masa_jax.evaluate", "--config=configs/eval_paper.py:tiny",
                          f"--checkpoint={defaults.BASE_MODEL_DIR}", f"--data={bad}", f"--output={tmp_path}/e.json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert f"{bad} row 0: no problem text" in lines[0] and "prompt, target_answer" in lines[0]
    assert not (tmp_path / "e.json").exists()
