"""Tests for masa_jax.data.sources: verl parquet (struct / JSON / Python-literal), JSONL, TFDS, errors.

math_sample.parquet holds rows 0..31 of the MATH train split in verl format (MIT license; see
tests/data/README.md), with its nested struct schema unchanged.
"""

import itertools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from masa_jax.data import sources
from masa_jax.data.sources import DataError, Problem

SAMPLE = os.path.join(os.path.dirname(__file__), "math_sample.parquet")


@pytest.fixture(scope="module")
def sample_rows():
    return pq.read_table(SAMPLE).to_pylist()


def _write(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def _stringify_gt(rows, fmt):
    """Copies rows with reward_model.ground_truth serialised as JSON or as a Python literal."""
    out = []
    for r in rows:
        gt = r["reward_model"]["ground_truth"]
        text = json.dumps(gt) if fmt == "json" else repr(gt)
        out.append({**r, "reward_model": {"ground_truth": text, "style": "rule"}})
    return out


def test_struct_sample_reads_every_field(sample_rows):
    loaded = sources.load_verl_parquet(SAMPLE)
    assert loaded.num_skipped == 0
    assert len(loaded.problems) == 32
    p0, p1 = loaded.problems[0], loaded.problems[1]
    assert p0 == Problem(
        uid="math_sample:0",
        question=sample_rows[0]["reward_model"]["ground_truth"]["question"],
        answer="0",
        solution=sample_rows[0]["reward_model"]["ground_truth"]["solution"],
        source=SAMPLE,
        row=0,
        difficulty=5,
    )
    assert p0.question.startswith("Let \\[f(x) = \\left\\{")
    assert p0.solution.endswith("$a+b=-3+3=\\boxed{0}$.")
    assert p1.answer == "98" and p1.uid == "math_sample:1" and p1.row == 1
    assert [p.row for p in loaded.problems] == list(range(32))
    # The same 32 targets as the raw file, in order.
    assert [p.answer for p in loaded.problems] == [
        r["reward_model"]["ground_truth"]["target"].strip() for r in sample_rows
    ]
    assert {p.difficulty for p in loaded.problems} <= {1, 2, 3, 4, 5, None}


@pytest.mark.parametrize("fmt", ["json", "literal"])
def test_string_ground_truth_matches_struct(tmp_path, sample_rows, fmt):
    path = _write(tmp_path / f"gt_{fmt}.parquet", _stringify_gt(sample_rows, fmt))
    got = sources.load_verl_parquet(path).problems
    want = sources.load_verl_parquet(SAMPLE).problems
    assert len(got) == 32
    for g, w in zip(got, want):
        assert (g.question, g.answer, g.solution, g.difficulty) == (w.question, w.answer, w.solution, w.difficulty)
        assert g.uid == f"gt_{fmt}:{g.row}"


def test_whole_reward_model_and_prompt_as_strings(tmp_path, sample_rows):
    rows = [
        {"prompt": json.dumps(r["prompt"]), "reward_model": repr(r["reward_model"])} for r in sample_rows[:4]
    ]
    got = sources.load_verl_parquet(_write(tmp_path / "s.parquet", rows)).problems
    assert [p.answer for p in got] == ["0", "98", "4", "17"]
    assert got[0].difficulty is None  # no level column


def test_question_falls_back_to_last_user_message(tmp_path):
    suffix = " Let's think step by step and output the final answer within \\boxed{}."
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?" + suffix},
                {"role": "assistant", "content": "ok"},
            ],
            "reward_model": {"ground_truth": {"target": "5", "solution": "2+3=5"}, "style": "rule"},
        },
        {
            "prompt": json.dumps([{"role": "user", "content": "Find x if x+1=2."}]),
            "reward_model": {"ground_truth": {"target": "1", "solution": None}, "style": "rule"},
        },
    ]
    # A column is either nested or string-typed, so the two layouts go in two files.
    got = sources.load_verl_parquet(_write(tmp_path / "fb.parquet", rows[:1])).problems
    got += sources.load_verl_parquet(_write(tmp_path / "fb_str.parquet", rows[1:])).problems
    assert got[0].question == "What is 2+3?"
    assert got[0].solution == "2+3=5"
    assert got[1].question == "Find x if x+1=2."
    assert got[1].solution is None


def test_plain_string_ground_truth_is_the_target(tmp_path):
    # verl's GSM8K / DeepScaleR layout: ground_truth is just the answer.
    rows = [
        {"prompt": [{"role": "user", "content": f"Q{i}"}], "reward_model": {"ground_truth": gt, "style": "rule"}}
        for i, gt in enumerate(["72", "{A,D}", "(3,-1)", "{1,2}", "[0,3)"])
    ]
    got = sources.load_verl_parquet(_write(tmp_path / "plain.parquet", rows)).problems
    assert [p.answer for p in got] == ["72", "{A,D}", "(3,-1)", "{1,2}", "[0,3)"]
    assert [p.question for p in got] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
    assert all(p.solution is None for p in got)


def test_missing_target_names_file_row_and_field(tmp_path, sample_rows):
    rows = [dict(r) for r in sample_rows]
    gt = dict(rows[17]["reward_model"]["ground_truth"], target=None)
    rows[17] = {**rows[17], "reward_model": {"ground_truth": gt, "style": "rule"}}
    path = _write(tmp_path / "train.parquet", rows, schema=pq.read_schema(SAMPLE))
    with pytest.raises(ValueError) as info:
        sources.load_verl_parquet(path)
    assert str(info.value) == f"{path} row 17: field reward_model.ground_truth.target: missing"
    assert isinstance(info.value, DataError)
    assert (info.value.row, info.value.field) == (17, "reward_model.ground_truth.target")

    loaded = sources.load_verl_parquet(path, on_error="skip")
    assert len(loaded.problems) == 31 and loaded.num_skipped == 1
    assert 17 not in [p.row for p in loaded.problems]
    assert loaded.skipped == (f"{path} row 17: field reward_model.ground_truth.target: missing",)


@pytest.mark.parametrize(
    "gt, field, reason",
    [
        ({"question": "q", "target": ""}, "reward_model.ground_truth.target", "empty"),
        ({"question": "q", "target": "   "}, "reward_model.ground_truth.target", "empty"),
        ('{"question": "q", "target": "1"', "reward_model.ground_truth", "not a JSON or Python-literal value"),
        ("{'question': 'q', 'target': __import__('os').getcwd()}", "reward_model.ground_truth", "not a JSON"),
        ('{"question": "q", "target": true}', "reward_model.ground_truth.target", "expected a string, got bool"),
        ('{"question": "q", "target": ["1"]}', "reward_model.ground_truth.target", "expected a string, got list"),
        ('{"question": "", "target": "1"}', "reward_model.ground_truth.question", "empty"),
    ],
)
def test_malformed_ground_truth(tmp_path, gt, field, reason):
    good = {"question": "ok", "target": "1"}
    rows = [{"reward_model": json.dumps({"ground_truth": g})} for g in (good, good, gt)]
    if not isinstance(gt, dict):
        rows[2] = {"reward_model": json.dumps({"ground_truth": "PLACEHOLDER"}).replace('"PLACEHOLDER"', json.dumps(gt))}
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as info:
        sources.load_verl_parquet(path)
    assert info.value.row == 2 and info.value.field == field
    assert info.value.reason.startswith(reason)
    assert str(info.value).startswith(f"{path} row 2: field {field}: {reason}")
    loaded = sources.load_verl_parquet(path, on_error="skip")
    assert [p.row for p in loaded.problems] == [0, 1] and loaded.num_skipped == 1


def test_literal_eval_never_executes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "getcwd", lambda: calls.append(1) or "/x")
    rows = [{"reward_model": {"ground_truth": "{'question': 'q', 'target': os.getcwd()}", "style": "rule"}}]
    with pytest.raises(DataError, match="field reward_model.ground_truth: not a JSON"):
        sources.load_verl_parquet(_write(tmp_path / "evil.parquet", rows))
    assert calls == []


def test_missing_reward_model_column_and_missing_prompt(tmp_path):
    path = _write(tmp_path / "nocol.parquet", [{"prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="nocol.parquet row 0: field reward_model: missing column"):
        sources.load_verl_parquet(path)
    rows = [{"reward_model": {"ground_truth": {"target": "1"}}}]
    with pytest.raises(DataError, match="row 0: field reward_model.ground_truth.question: missing"):
        sources.load_verl_parquet(_write(tmp_path / "noq.parquet", rows))
    rows = [{"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": {"target": "1"}}}]
    with pytest.raises(DataError, match="row 0: field prompt: no user message"):
        sources.load_verl_parquet(_write(tmp_path / "nouser.parquet", rows))


def test_on_error_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_error must be"):
        sources.load_verl_parquet(SAMPLE, on_error="ignore")


# --------------------------------------------------------------------------- JSONL


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_fields_ids_and_rows(tmp_path):
    path = _jsonl(
        tmp_path / "aime.jsonl",
        [
            json.dumps({"problem": "What is 1+1?", "answer": "2", "solution": "1+1=2", "id": "p-a"}),
            "",
            json.dumps({"problem": "What is 6*7?", "answer": 42}),
            json.dumps({"question": "Alias?", "target": " 3 ", "level": "Level 2", "id": 9}),
        ],
    )
    got = sources.load_jsonl(path).problems
    assert got == (
        Problem("aime:p-a", "What is 1+1?", "2", "1+1=2", path, 0, None),
        Problem("aime:2", "What is 6*7?", "42", None, path, 2, None),
        Problem("aime:9", "Alias?", "3", None, path, 3, 2),
    )
    assert sources.load_problems(path).problems == got


def test_jsonl_malformed_lines(tmp_path):
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"problem": "ok", "answer": "1"}),
            json.dumps({"problem": "no answer"}),
            "{not json",
            json.dumps(["a", "list"]),
            json.dumps({"problem": "nan", "answer": float("nan")}),
            json.dumps({"problem": "ok2", "answer": "2", "id": [1]}),
            json.dumps({"problem": "ok3", "answer": 2.5}),
        ],
    )
    with pytest.raises(DataError) as info:
        sources.load_jsonl(path)
    assert str(info.value) == f"{path} row 1: field answer: missing"
    loaded = sources.load_jsonl(path, on_error="skip")
    assert [(p.row, p.answer) for p in loaded.problems] == [(0, "1"), (6, "2.5")]
    assert loaded.num_skipped == 5
    assert loaded.skipped[1].startswith(f"{path} row 2: field (line): invalid JSON")
    assert loaded.skipped[2] == f"{path} row 3: field (line): expected a JSON object, got list"
    assert loaded.skipped[3] == f"{path} row 4: field answer: non-finite number nan"
    assert loaded.skipped[4] == f"{path} row 5: field id: expected a string or integer, got list"


def test_load_all_concatenates_and_rejects_duplicate_uids(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "p", "answer": "1"}), "{bad"])
    loaded = sources.load_all(["", SAMPLE, a], on_error="skip")
    assert len(loaded.problems) == 33 and loaded.problems[-1].uid == "a:0"
    assert loaded.num_skipped == 1 and loaded.skipped[0].startswith(f"{a} row 1: field (line)")
    os.makedirs(tmp_path / "other")
    b = _jsonl(tmp_path / "other" / "a.jsonl", [json.dumps({"problem": "q", "answer": "2"})])
    with pytest.raises(ValueError, match="duplicate uid 'a:0'"):
        sources.load_all([a, b], on_error="skip")


def test_load_problems_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected \*.parquet, \*.jsonl, tfds:<name>, toy:..., toy-heldout:...$"):
        sources.load_problems(str(tmp_path / "x.csv"))
    assert len(sources.load_problems(SAMPLE).problems) == 32


# --------------------------------------------------------------------------- TFDS


def _fake_tfds(records, calls):
    def data_source(name, *, split=None, data_dir=None, download=True):
        calls.append({"name": name, "split": split, "data_dir": data_dir, "download": download})
        return records

    return types.SimpleNamespace(data_source=data_source)


def test_tfds_through_data_source(monkeypatch):
    records = [
        {"problem": np.bytes_(b"What is 2+2?"), "answer": np.array(b"4"), "solution": b"2+2=4"},
        {"problem": b"What is 3+3?", "answer": np.array(b"6", dtype=object), "solution": b""},
        {"question": b"Missing answer"},
    ]
    calls = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(records, calls))
    with pytest.raises(DataError, match=r"^tfds:toy_math/test row 2: field answer: missing$"):
        sources.load_problems("tfds:toy_math:test")
    loaded = sources.load_problems("tfds:toy_math:test", on_error="skip", data_dir="/d")
    assert calls[-1] == {"name": "toy_math", "split": "test", "data_dir": "/d", "download": False}
    assert loaded.problems == (
        Problem("toy_math/test:0", "What is 2+2?", "4", "2+2=4", "tfds:toy_math/test", 0, None),
        Problem("toy_math/test:1", "What is 3+3?", "6", None, "tfds:toy_math/test", 1, None),
    )
    assert loaded.num_skipped == 1
    # The default split and custom keys.
    calls.clear()
    records[:] = [{"q": b"Q", "a": 5}]
    got = sources.load_tfds("other", question_key="q", answer_key="a").problems
    assert calls[0]["split"] == "train" and got[0].question == "Q" and got[0].answer == "5"


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'masa_jax\[tfds\]'"):
        sources.load_problems("tfds:gsm8k")


class _NotFound(ValueError):
    """Stands in for tensorflow_datasets.core.registered.DatasetNotFoundError."""


def _tfds_with_registry(names, prepared=()):
    """A tfds whose data_source knows `names`; the ones not in `prepared` fail as an unprepared dataset does."""
    listing = "\n\t- ".join(names)

    def data_source(name, *, split=None, data_dir=None, download=True):
        base = name.split(":")[0].split("/")[0]
        if base not in names:  # the real message: every registered name, one a line
            raise _NotFound(f"Dataset {base} not found.\nAvailable datasets:\n\t- {listing}\n")
        if base not in prepared:
            raise ValueError("Dataset info file format is not set! For random access, one of the\n following ...")
        return [{"problem": b"q", "answer": b"1"}]

    core = types.SimpleNamespace(registered=types.SimpleNamespace(DatasetNotFoundError=_NotFound))
    return types.SimpleNamespace(data_source=data_source, core=core, list_builders=lambda: list(names))


def test_unknown_tfds_name_is_one_short_line_naming_the_closest_three(monkeypatch):
    # ~1,300 fillers sharing no character with the names asked for, as most of TFDS's registry does.
    fillers = ["".join(t) for t in itertools.product("pqrvwxyz", repeat=4)][:1300]
    names = fillers + ["gsm8k", "gsm8k_hard", "math", "math_dataset", "mnist"]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _tfds_with_registry(names))
    with pytest.raises(ValueError) as info:
        sources.load_problems("tfds:gsm8kk:test")
    msg = str(info.value)
    assert msg == ("TFDS has no dataset 'gsm8kk'; closest registered names: gsm8k, gsm8k_hard, math (a dataset "
                   "prepared outside the registry is found through config.data.tfds_data_dir / $TFDS_DATA_DIR)")
    # A config / version in the spec is not part of the name compared.
    with pytest.raises(ValueError, match=r"^TFDS has no dataset 'mathh'; closest registered names: math, "
                                         r"math_dataset, "):
        sources.load_problems("tfds:mathh/algebra:1.0.0:test")
    # Through the trainer's error wrapper it stays one line.
    from masa_jax import errors
    with pytest.raises(errors.UserError) as info:
        with errors.data_file_errors("tfds:gsm8kk:test"):
            sources.load_problems("tfds:gsm8kk:test")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300 and "gsm8k, gsm8k_hard" in str(info.value)


def test_unprepared_tfds_dataset_names_the_data_dir_to_set(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _tfds_with_registry(["gsm8k", "math"], prepared=["math"]))
    monkeypatch.setenv("TFDS_DATA_DIR", "/env/tfds")
    with pytest.raises(ValueError, match=r"^TFDS dataset 'gsm8k' in /given: Dataset info file format is not set! "
                                         r"For random access, one of the following \.\.\. \(is it prepared there\? "
                                         r"`tfds build` it, or set config.data.tfds_data_dir / \$TFDS_DATA_DIR"):
        sources.load_problems("tfds:gsm8k:test", data_dir="/given")
    with pytest.raises(ValueError, match=r"^TFDS dataset 'gsm8k' in /env/tfds: "):
        sources.load_problems("tfds:gsm8k:test")
    assert sources.load_problems("tfds:math:test").problems[0].question == "q"


# --------------------------------------------------------------------------- misc


def test_filter_overlong_counts():
    problems = [Problem(f"u{i}", "x" * i, "1") for i in range(10)]
    kept, dropped = sources.filter_overlong(problems, lambda p: len(p.question) + 2, max_prompt_length=6)
    assert [p.uid for p in kept] == ["u0", "u1", "u2", "u3", "u4"]
    assert dropped == 5


def test_problem_is_frozen():
    p = Problem("u", "q", "a")
    with pytest.raises(Exception):
        p.answer = "b"  # type: ignore[misc]
    assert (p.solution, p.source, p.row, p.difficulty) == (None, "", -1, None)


def test_sources_import_without_jax_or_pyarrow():
    code = (
        "import sys, masa_jax.data, masa_jax.data.sources, masa_jax.toy; "
        "print(sorted(m for m in ('jax', 'grain', 'pyarrow', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- generated sources


def test_the_toy_world_is_found_through_its_entry_point_not_an_import():
    """masa_jax.data names no world: the toy prefixes come from setup.py's `masa_jax.sources` entry
    points, and loading one imports the toy world only then."""
    import ast
    import pathlib

    data_dir = pathlib.Path(sources.__file__).parent
    for path in data_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("masa_jax.toy") for n in names), f"{path.name} imports {names}"
    code = (
        "import sys; from masa_jax.data import sources; before = 'masa_jax.toy' in sys.modules; "
        "ps = sources.load_problems('toy-heldout:3:7').problems; "
        "print(before, [p.uid for p in ps], [p.answer for p in ps])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from masa_jax.toy import world
    expected = world.heldout(3, 7)
    assert out.stdout.strip() == f"False {[p.uid for p in expected]} {[p.answer for p in expected]}"


def test_a_registered_source_loads_everywhere_a_spec_is_read(monkeypatch):
    from masa_jax import errors
    from masa_jax.data import pipeline

    made = [Problem(f"count:{i}", f"Compute {i}+1.", str(i + 1), source="count", row=i) for i in range(5)]
    monkeypatch.setitem(sources._GENERATORS, "count", lambda spec: made[: int(spec.split(":")[1])])
    assert sources.load_problems("count:4").problems == tuple(made[:4])
    assert sources.is_named_source("count:4") and not sources.is_named_source("counts.jsonl")
    errors.check_data_file_names(["count:4"])  # a name, not a file: nothing to check on disk
    shares = [pipeline.load_host_problems("count:5", process_index=h, process_count=2).problems for h in (0, 1)]
    assert shares[0] + shares[1] == tuple(made) and len(shares[0]) == len(sources.host_block(5, 0, 2))
    assert "count:..." in sources.expected_kinds()


def test_register_source_rejects_url_schemes_and_odd_prefixes():
    for bad in ("gs", "tfds", "Toy", "a:b", ""):
        with pytest.raises(ValueError, match="bad source prefix"):
            sources.register_source(bad, lambda spec: [])


def test_without_installed_entry_points_the_error_says_how_to_register_them(monkeypatch):
    monkeypatch.setattr(sources, "_GENERATORS", {})
    monkeypatch.setattr(sources, "_ENTRY_POINTS_READ", False)
    monkeypatch.setattr(sources.importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(ValueError, match=r"don't know how to read 'toy:8'.*no generated sources such as toy:<n> "
                                         r"are registered: `pip install -e \.`"):
        sources.load_problems("toy:8")


AUTHORS_ROW = os.path.join(os.path.dirname(__file__), "deepscaler_train_example.json")
_AUTHORS_QUESTION = (
    "The operation $\\otimes$ is defined for all nonzero numbers by $a \\otimes b = \\frac{a^{2}}{b}$. "
    "Determine $[(1 \\otimes 2) \\otimes 3] - [1 \\otimes (2 \\otimes 3)]$."
)


def test_authors_deepscaler_row_loses_its_instruction_on_every_path(tmp_path):
    # Regression: ground_truth.question was returned as is, so the prompt builder appended the
    # instruction a second time to the authors' DeepScaleR rows.
    with open(AUTHORS_ROW) as f:
        row = json.load(f)
    assert row["reward_model"]["ground_truth"]["question"].endswith("within \\boxed{}.")
    struct = sources.load_verl_parquet(_write(tmp_path / "ds.parquet", [row])).problems[0]
    as_json = sources.load_verl_parquet(_write(tmp_path / "ds_str.parquet", _stringify_gt([row], "json"))).problems[0]
    (tmp_path / "ds.jsonl").write_text(json.dumps({"question": row["prompt"][0]["content"],
                                                   "answer": row["answer"]}) + "\n")
    flat = sources.load_jsonl(tmp_path / "ds.jsonl").problems[0]
    for p in (struct, as_json, flat):
        assert p.question == _AUTHORS_QUESTION
        assert p.answer == "-\\frac{2}{3}"
