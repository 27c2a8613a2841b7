"""The OOD loaders on local samples of all ten benchmarks (tests/eval/ood_data: the authors' eval/data layout
and the HF datasets' columns), their prompts, and one-line errors naming the file, row and field."""
import json
import os
import random

import pytest

from masa_jax import errors
from masa_jax.evaluation.ood import benchmarks as B
from masa_jax.evaluation.ood import protocol

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ood_data")
LOGIC = ("ProntoQA", "ProofWriter", "FOLIO", "LogicalDeduction", "AR-LSAT")
ENTRIES = [os.path.join(DATA, "eval_data", n, "dev.json") for n in LOGIC] + [
    os.path.join(DATA, "eval_data", "MBPP", "mbpp.jsonl")] + [
    os.path.join(DATA, "hf", f"{n}.jsonl") for n in ("gpqa_diamond", "rbench", "arc_challenge", "scibench")]


def test_all_ten_load_with_their_domains():
    loaded = protocol.load_all(ENTRIES)
    assert sorted(loaded) == sorted(B.SPECS)
    assert {n: (b.domain, len(b.items)) for n, b in loaded.items()} == {
        "ProntoQA": ("logic", 2), "ProofWriter": ("logic", 2), "FOLIO": ("logic", 1), "LogicalDeduction": ("logic", 1),
        "AR-LSAT": ("logic", 1), "MBPP": ("coding", 2), "gpqa_diamond": ("science", 2), "rbench": ("science", 1),
        "arc_challenge": ("science", 2), "scibench": ("science", 2)}
    assert protocol.load_all(ENTRIES, limit=1)["MBPP"].items[0].uid == "MBPP:11"


def test_prompts_are_the_authors():
    loaded = protocol.load_all(ENTRIES)
    p = loaded["ProntoQA"].items[0]
    assert p.prompt.endswith("Context:\nWumpuses are red. Max is a wumpus.\n\nQuestion: Is the following statement "
                             "true or false? Max is red.\n\nOptions:\nA) True\nB) False\n\nReasoning:")
    assert p.prompt.startswith("Given a problem statement") and (p.answer, p.labels) == ("A", ("A", "B"))
    # GPQA: the authors' random.seed(42) shuffle of [correct, incorrect 1..3], the same for every row.
    order = ["c", "i1", "i2", "i3"]
    random.seed(42)
    random.shuffle(order)
    g = loaded["gpqa_diamond"].items[0]
    assert g.answer == "ABCD"[order.index("c")]
    texts = {"c": "-1 e", "i1": "+1 e", "i2": "0", "i3": "+2 e"}
    assert g.prompt == ("Think step-by-step and choose the best answer from the following options. Answer only with "
                        "the letter of the option inside \\boxed{}.\nWhat is the charge of an electron?\n"
                        + "\n".join(f"{L}: {texts[k]}" for L, k in zip("ABCD", order)))
    arc = loaded["arc_challenge"].items[1]  # numeric labels shown and graded as letters
    assert arc.answer == "A" and arc.prompt.endswith("A: sunlight\nB: sand\nC: salt\nD: smoke")
    assert loaded["rbench"].items[0].labels == ("A", "B", "C", "D", "E")  # F is None: not an option
    sci = loaded["scibench"].items[1]
    assert sci.prompt == "Compute the energy of a photon of wavelength 620 nm." and float(sci.answer) == 3.2
    m = loaded["MBPP"].items[0]
    assert m.prompt.startswith("Please refer the given examples and generate a python function for my problem.\n"
                               "Examples are listed as follows:\n- Example 1:\n>>> Problem:\nWrite a function to double")
    assert "```python\ndef double(x):\n    return 2 * x\n```" in m.prompt and "- Example 4" not in m.prompt
    assert m.prompt.endswith("Here is my problem:\n>>> Problem:\nWrite a function to find the maximum of a list.\n"
                             ">>> Test Cases:\nassert max_of([1, 3, 2]) == 3\nassert max_of([-1]) == -1")
    assert m.tests == ("assert max_of([1, 3, 2]) == 3", "assert max_of([-1]) == -1")


def test_names_from_entries():
    assert B.benchmark_for("gpqa=/x/train.parquet") == ("gpqa_diamond", "/x/train.parquet")
    assert B.benchmark_for("/d/eval/data/AR-LSAT/dev.json")[0] == "AR-LSAT"
    with pytest.raises(errors.UserError, match="no benchmark name in the path"):
        B.benchmark_for("/d/test.parquet")
    with pytest.raises(errors.UserError, match="unknown benchmark 'hellaswag'"):
        B.benchmark_for("hellaswag=/d/x.jsonl")


def _write(path, rows, jsonl=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return str(path)


def test_errors_name_the_file_row_and_field(tmp_path):
    gpqa = _write(tmp_path / "gpqa_diamond.jsonl", [{"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b",
                                                    "Incorrect Answer 2": "c"}])
    with pytest.raises(errors.UserError, match=f"{gpqa} row 0: no `Incorrect Answer 3` field"):
        protocol.load_all([gpqa])
    sci = _write(tmp_path / "scibench.jsonl", [{"problem_text": "p", "answer_number": "fast", "unit": ""}])
    with pytest.raises(errors.UserError, match=f"{sci} row 0: field `answer_number` 'fast' is not a number"):
        protocol.load_all([sci])
    arc = _write(tmp_path / "arc.jsonl", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                           "answerKey": "C"}])
    with pytest.raises(errors.UserError, match=r"row 0: field `answerKey` 'C' is not one of the labels"):
        protocol.load_all([f"arc_challenge={arc}"])
    logic = _write(tmp_path / "data" / "FOLIO" / "dev.json", [{"context": "c", "question": "q", "options": ["A) x"],
                                                               "answer": "A"}], jsonl=False)
    with pytest.raises(errors.UserError, match="few-shot prompt .*icl_examples/FOLIO_CoT.txt does not exist"):
        protocol.load_all([logic])
    os.makedirs(tmp_path / "data" / "icl_examples")
    (tmp_path / "data" / "icl_examples" / "FOLIO_CoT.txt").write_text("[[CONTEXT]] [[QUESTION]]")
    with pytest.raises(errors.UserError, match=r"FOLIO_CoT.txt: the few-shot prompt has no \[\[OPTIONS\]\]"):
        protocol.load_all([logic])
    (tmp_path / "data" / "icl_examples" / "FOLIO_CoT.txt").write_text("[[CONTEXT]] [[QUESTION]] [[OPTIONS]]")
    _write(tmp_path / "data" / "FOLIO" / "dev.json", [{"context": "c", "question": "q", "options": ["x"],
                                                      "answer": "A"}], jsonl=False)
    with pytest.raises(errors.UserError, match=r"row 0: field `options` entry 'x' does not start with a label"):
        protocol.load_all([logic])
    mbpp = _write(tmp_path / "mbpp.jsonl", [{"text": "t", "code": "c", "task_id": 1, "test_list": ["assert 1"]}] * 3)
    with pytest.raises(errors.UserError, match="MBPP needs the authors' mbpp.jsonl layout .* it has 3 rows"):
        protocol.load_all([mbpp])
    bad = tmp_path / "rbench.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(errors.UserError, match=f"{bad} line 1: not JSON"):
        protocol.load_all([str(bad)])
    with pytest.raises(errors.UserError, match="rbench file /nope/rbench.jsonl does not exist"):
        protocol.load_all(["/nope/rbench.jsonl"])


@pytest.mark.slow  # the CLI in a subprocess
def test_evaluate_cli_runs_the_ood_suite_on_the_toy_model(tmp_path):
    """`python -m masa_jax.evaluate --config=configs/eval_paper_ood.py:tiny` on the shipped toy base model over the
    local samples of all ten benchmarks: a row per benchmark, per-domain and overall averages, JSON + Markdown."""
    import subprocess
    import sys

    from masa_jax.toy import defaults
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "ood.json"
    res = subprocess.run(
        [sys.executable, "-m", "masa_jax.evaluate", "--config=configs/eval_paper_ood.py:tiny",
         f"--checkpoint={defaults.BASE_MODEL_DIR}", "--data=" + ",".join(ENTRIES), "--n=2", "--k=1,2",
         "--max_new_tokens=16", f"--output={out}"], cwd=repo, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(B.SPECS) <= set(r) and {"average/science", "average/logic", "average/coding", "average"} <= set(r)
    for name in B.SPECS:
        assert r[name]["n"] == 2 and 0 <= r[name]["pass@1"] <= r[name]["pass@2"] <= 1
    assert r["average/logic"]["problems"] == 7 and r["average"]["problems"] == 16 and r["average"]["benchmarks"] == 10
    assert r["average"]["pass@1"] == pytest.approx(sum(r[n]["pass@1"] for n in B.SPECS) / 10)
    assert r["settings"]["suite"] == "ood" and r["settings"]["temperature"] == 0.6
    md = (tmp_path / "ood.md").read_text()
    for needle in ("| MBPP | coding | 2 |", "| **average/logic** | logic | 7 |", "| **average** | all | 16 |"):
        assert needle in md, needle


def test_suite_setting():
    import importlib.util

    from masa_jax import config as config_lib
    from masa_jax.evaluation import paper
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("ood_cfg", os.path.join(repo, "configs", "eval_paper_ood.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = config_lib.resolve(module.get_config())
    s = paper.resolve_settings(c)
    assert (s.suite, s.n, s.temperature, s.top_p, s.max_new_tokens) == ("ood", 32, 0.6, 1.0, 16384)
    assert paper.resolve_settings(config_lib.resolve(config_lib.base_config())).suite == "math"
    with pytest.raises(errors.UserError, match="config.evaluate.suite must be one of"):
        paper.resolve_settings(c, {"suite": "logic"})


def test_evaluate_cli_refuses_meta_with_the_ood_suite(tmp_path):
    """The OOD suite has no meta path: --meta is refused in one line before any model is loaded."""
    import subprocess
    import sys

    from masa_jax.toy import defaults
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run(
        [sys.executable, "-m", "masa_jax.evaluate", "--config=configs/eval_paper_ood.py:tiny",
         f"--checkpoint={defaults.BASE_MODEL_DIR}", "--data=" + ",".join(ENTRIES), "--meta",
         f"--output={tmp_path / 'ood.json'}"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --meta: the out-of-domain suite has no meta path")
    assert not (tmp_path / "ood.json").exists()
