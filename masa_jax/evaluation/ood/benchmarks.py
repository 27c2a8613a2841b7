"""The paper's ten out-of-domain benchmarks (the authors' eval.sh): their file layouts, prompts and graders.

    science  gpqa_diamond, rbench, arc_challenge, scibench   the HF datasets' columns, as .parquet / .jsonl / .json
    logic    ProntoQA, ProofWriter, FOLIO, LogicalDeduction, AR-LSAT   the authors' eval/data/<NAME>/dev.json
    coding   MBPP                                            the authors' eval/data/MBPP/mbpp.jsonl

Prompts are the authors' (eval/utils.py): the choice sets ask for the letter inside \\boxed{} after the
question and its "A: ..." options (GPQA's four answers shuffled with Python's random.seed(42), as theirs);
SciBench is the raw problem text; each logic set fills its few-shot chain-of-thought file
eval/data/icl_examples/<NAME>_CoT.txt ([[CONTEXT]], [[QUESTION]], [[OPTIONS]]; read from next to the
benchmark's folder, as the authors ship it) with the row's context, question and options, one option per line
(their code joins the options with a literal backslash-n, which the few-shot examples do not show); MBPP is
their three-shot prompt (rows 1-3 of mbpp.jsonl the examples, rows 10-509 the problems, each with its test
asserts). ARC's numeric option labels ("1".."4", some rows) are shown and graded as A..D. Grading: `graders`.

A missing file, a missing or malformed field stops with one line naming the file, the row and the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Any, Callable, Sequence

from masa_jax import errors

SCIENCE, LOGIC, CODING = "science", "logic", "coding"
DOMAINS = (SCIENCE, LOGIC, CODING)

_CHOICE_INSTRUCTION = ("Think step-by-step and choose the best answer from the following options. "
                       "Answer only with the letter of the option inside \\boxed{}.\n")


@dataclasses.dataclass(frozen=True)
class Item:
    """One problem: the user message and what grades a response."""

    uid: str
    prompt: str
    answer: str = ""                 # choice: the gold label; number: the gold value as text
    labels: tuple[str, ...] = ()     # choice: the option labels
    unit: str = ""                   # number: SciBench's unit
    tests: tuple[str, ...] = ()      # code: the assert lines
    setup: str = ""                  # code: test set-up code


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    domain: str
    kind: str                        # choice | logic | number | code
    items: tuple[Item, ...]


# ----------------------------------------------------------------------------------------- rows


def _read_rows(path: str, name: str) -> list[dict]:
    if not os.path.isfile(path):
        raise errors.UserError(f"{name} file {path} does not exist: fix --data")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        elif path.endswith(".jsonl"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise errors.UserError(f"{path} line {i + 1}: not JSON ({e.msg})") from e
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise errors.UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e
            if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                rows = rows["data"]
            if not isinstance(rows, list):
                raise errors.UserError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
        else:
            raise errors.UserError(f"{name} file {path}: expected a .json, .jsonl or .parquet file")
    except (ValueError, OSError) as e:
        if isinstance(e, errors.UserError):
            raise
        raise errors.UserError(f"{name} file {path} cannot be read ({errors.one_line(e)})") from e
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise errors.UserError(f"{path} row {i}: expected an object with fields, got {type(row).__name__}")
    if not rows:
        raise errors.UserError(f"{name} file {path} holds no rows")
    return rows


class _Rows:
    """Field access that names the file, the row and the field on a miss."""

    def __init__(self, path: str, name: str, needs: Sequence[str]):
        self.path, self.name, self.needs = path, name, tuple(needs)

    def get(self, row: dict, i: int, field: str, kind: type | tuple = str, optional: bool = False) -> Any:
        v = row.get(field)
        if v is None or (isinstance(v, str) and not v.strip() and not optional):
            if optional:
                return None
            raise errors.UserError(f"{self.path} row {i}: no `{field}` field ({self.name} rows need "
                                   f"{', '.join(self.needs)}; this row has {', '.join(sorted(map(str, row))) or 'none'})")
        if not isinstance(v, kind) or isinstance(v, bool):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise errors.UserError(f"{self.path} row {i}: field `{field}` must be {want}, got {type(v).__name__}")
        return v


def _uid(name: str, row: dict, i: int, *fields: str) -> str:
    for f in fields:
        if row.get(f) not in (None, ""):
            return f"{name}:{row[f]}"
    return f"{name}:{i}"


def _options_text(labels: Sequence[str], texts: Sequence[str]) -> str:
    return "\n".join(f"{label}: {text}" for label, text in zip(labels, texts))


# ----------------------------------------------------------------------------------------- science


def _gpqa(path: str, name: str) -> list[Item]:
    answers = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
    rows = _Rows(path, name, ("Question",) + answers)
    order = list(range(4))
    random.Random(42).shuffle(order)  # the authors re-seed 42 before each row's shuffle: one order for all rows
    items = []
    for i, row in enumerate(_read_rows(path, name)):
        texts = [str(rows.get(row, i, f, (str, int, float))).strip() for f in answers]
        q = rows.get(row, i, "Question")
        labels = ("A", "B", "C", "D")
        items.append(Item(uid=_uid(name, row, i, "Record ID"), answer=labels[order.index(0)], labels=labels,
                          prompt=_CHOICE_INSTRUCTION + f"{q}\n" + _options_text(labels, [texts[j] for j in order])))
    return items


def _rbench(path: str, name: str) -> list[Item]:
    rows = _Rows(path, name, ("question", "A", "B", "answer"))
    items = []
    for i, row in enumerate(_read_rows(path, name)):
        q = rows.get(row, i, "question")
        labels = tuple(L for L in "ABCDEF" if row.get(L) not in (None, ""))
        if len(labels) < 2 or labels != tuple("ABCDEF"[:len(labels)]):
            rows.get(row, i, "B" if "A" in labels else "A")  # names the first missing option
            raise errors.UserError(f"{path} row {i}: options must be A, B, ... without gaps, got {', '.join(labels)}")
        answer = _gold_label(rows.get(row, i, "answer"), labels, path, i, "answer")
        items.append(Item(uid=_uid(name, row, i, "index", "id"), answer=answer, labels=labels,
                          prompt=_CHOICE_INSTRUCTION + f"{q}\n" + _options_text(labels, [str(row[L]) for L in labels])))
    return items


def _arc(path: str, name: str) -> list[Item]:
    rows = _Rows(path, name, ("question", "choices", "answerKey"))
    items = []
    for i, row in enumerate(_read_rows(path, name)):
        q = rows.get(row, i, "question")
        choices = rows.get(row, i, "choices", dict)
        texts, raw = choices.get("text"), choices.get("label")
        if not isinstance(texts, (list, tuple)) or not isinstance(raw, (list, tuple)) or len(texts) != len(raw) \
                or len(raw) < 2:
            raise errors.UserError(f"{path} row {i}: field `choices` must hold equal lists `text` and `label`")
        raw = [str(x).strip() for x in raw]
        letters = tuple("ABCDEFGH"[:len(raw)])
        to_letter = dict(zip(raw, letters))  # "1".."4" -> "A".."D" (and "A" -> "A")
        key = str(rows.get(row, i, "answerKey", (str, int))).strip()
        if key not in to_letter:
            raise errors.UserError(f"{path} row {i}: field `answerKey` {key!r} is not one of the labels {raw}")
        items.append(Item(uid=_uid(name, row, i, "id"), answer=to_letter[key], labels=letters,
                          prompt=_CHOICE_INSTRUCTION + f"{q}\n" + _options_text(letters, [str(t) for t in texts])))
    return items


def _scibench(path: str, name: str) -> list[Item]:
    rows = _Rows(path, name, ("problem_text", "answer_number", "unit"))
    items = []
    for i, row in enumerate(_read_rows(path, name)):
        text = rows.get(row, i, "problem_text")
        gold = rows.get(row, i, "answer_number", (str, int, float))
        try:
            value = float(str(gold).replace(",", ""))
        except ValueError:
            raise errors.UserError(f"{path} row {i}: field `answer_number` {gold!r} is not a number") from None
        unit = rows.get(row, i, "unit", str, optional=True) or ""
        items.append(Item(uid=_uid(name, row, i, "problemid"), prompt=text, answer=repr(value), unit=unit))
    return items


def _gold_label(value: Any, labels: Sequence[str], path: str, i: int, field: str) -> str:
    s = str(value).strip().strip("()").strip()
    if s[:1] in labels and (len(s) == 1 or not s[1].isalnum()):
        return s[:1]
    raise errors.UserError(f"{path} row {i}: field `{field}` {value!r} is not one of the labels {', '.join(labels)}")


# ----------------------------------------------------------------------------------------- logic


def few_shot_path(path: str, name: str) -> str:
    """eval/data/<NAME>/dev.json -> eval/data/icl_examples/<NAME>_CoT.txt (the authors' layout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "icl_examples", f"{name}_CoT.txt")


_PLACEHOLDERS = ("[[CONTEXT]]", "[[QUESTION]]", "[[OPTIONS]]")


def _logic(path: str, name: str) -> list[Item]:
    rows = _Rows(path, name, ("context", "question", "options", "answer"))
    data = _read_rows(path, name)
    icl = few_shot_path(path, name)
    if not os.path.isfile(icl):
        raise errors.UserError(f"{path}: its few-shot prompt {icl} does not exist (the authors ship it as "
                               f"eval/data/icl_examples/{name}_CoT.txt, next to the benchmark's folder)")
    with open(icl, encoding="utf-8") as f:
        template = f.read()
    missing = [p for p in _PLACEHOLDERS if p not in template]
    if missing:
        raise errors.UserError(f"{icl}: the few-shot prompt has no {', '.join(missing)} placeholder")
    items = []
    for i, row in enumerate(data):
        context, question = rows.get(row, i, "context").strip(), rows.get(row, i, "question").strip()
        options = [str(o).strip() for o in rows.get(row, i, "options", (list, tuple))]
        labels = []
        for o in options:
            m = re.match(r"\(?([A-H])\s*[).:]", o)
            if not m:
                raise errors.UserError(f"{path} row {i}: field `options` entry {o[:40]!r} does not start with "
                                       "a label such as 'A)'")
            labels.append(m.group(1))
        answer = _gold_label(rows.get(row, i, "answer"), labels, path, i, "answer")
        # One replace per placeholder, in a single pass: a row's text holding "[[OPTIONS]]" stays as written.
        values = {"[[CONTEXT]]": context, "[[QUESTION]]": question, "[[OPTIONS]]": "\n".join(options)}
        prompt = re.sub(r"\[\[(?:CONTEXT|QUESTION|OPTIONS)\]\]", lambda m: values[m.group(0)], template)
        items.append(Item(uid=_uid(name, row, i, "id"), prompt=prompt, answer=answer, labels=tuple(labels)))
    return items


# ----------------------------------------------------------------------------------------- coding


_MBPP_SHOTS, _MBPP_FIRST, _MBPP_END = (1, 2, 3), 10, 510  # the authors' read_test_examples


def _mbpp_example(rows: _Rows, row: dict, i: int, with_code: bool) -> str:
    tests = rows.get(row, i, "test_list", (list, tuple))
    text = f">>> Problem:\n{rows.get(row, i, 'text').strip()}\n>>> Test Cases:\n" + "\n".join(map(str, tests)) + "\n"
    if with_code:
        code = rows.get(row, i, "code").replace("\r", "").replace("\t", "    ")
        text += f"\n>>> Code:\n```python\n{code}\n```"
    return text


def _mbpp(path: str, name: str) -> list[Item]:
    rows = _Rows(path, name, ("text", "code", "task_id", "test_list"))
    data = _read_rows(path, name)
    if len(data) <= _MBPP_FIRST:
        raise errors.UserError(f"{path}: MBPP needs the authors' mbpp.jsonl layout (rows 1-3 the few-shot "
                               f"examples, rows {_MBPP_FIRST}-{_MBPP_END - 1} the problems); it has {len(data)} rows")
    shots = "\n\n".join(f"- Example {i}:\n" + _mbpp_example(rows, data[i], i, True) for i in _MBPP_SHOTS)
    items = []
    for i in range(_MBPP_FIRST, min(_MBPP_END, len(data))):
        row = data[i]
        tests = tuple(str(t) for t in rows.get(row, i, "test_list", (list, tuple)))
        if not tests:
            raise errors.UserError(f"{path} row {i}: field `test_list` is empty")
        prompt = ("Please refer the given examples and generate a python function for my problem.\n"
                  f"Examples are listed as follows:\n{shots}\n\nHere is my problem:\n"
                  + _mbpp_example(rows, row, i, False)).strip()
        setup = rows.get(row, i, "test_setup_code", str, optional=True) or ""
        items.append(Item(uid=f"{name}:{rows.get(row, i, 'task_id', (int, str))}", prompt=prompt, tests=tests,
                          setup=setup))
    return items


# ----------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Spec:
    domain: str
    kind: str
    load: Callable[[str, str], list[Item]]
    aliases: tuple[str, ...]


SPECS: dict[str, Spec] = {
    "gpqa_diamond": Spec(SCIENCE, "choice", _gpqa, ("gpqadiamond", "gpqa")),
    "rbench": Spec(SCIENCE, "choice", _rbench, ("rbench", "rbencht", "rbenchten")),
    "arc_challenge": Spec(SCIENCE, "choice", _arc, ("arcchallenge", "arc", "ai2arc")),
    "scibench": Spec(SCIENCE, "number", _scibench, ("scibench",)),
    "ProntoQA": Spec(LOGIC, "logic", _logic, ("prontoqa",)),
    "ProofWriter": Spec(LOGIC, "logic", _logic, ("proofwriter",)),
    "FOLIO": Spec(LOGIC, "logic", _logic, ("folio",)),
    "LogicalDeduction": Spec(LOGIC, "logic", _logic, ("logicaldeduction",)),
    "AR-LSAT": Spec(LOGIC, "logic", _logic, ("arlsat",)),
    "MBPP": Spec(CODING, "code", _mbpp, ("mbpp",)),
}


def _key(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def benchmark_for(entry: str) -> tuple[str, str]:
    """(benchmark name, path) of a --data entry: NAME=PATH, or a path whose file stem or a folder is a
    benchmark's name (eval/data/ProntoQA/dev.json, /data/gpqa_diamond.parquet)."""
    if "=" in entry and not os.path.exists(entry):
        name, path = entry.split("=", 1)
        for canonical, spec in SPECS.items():
            if _key(name) in (_key(canonical),) + spec.aliases:
                return canonical, path
        raise errors.UserError(f"--data {entry}: unknown benchmark {name!r}; known: {', '.join(SPECS)}")
    parts = [os.path.splitext(os.path.basename(entry))[0]] + list(reversed(os.path.dirname(entry).split(os.sep)))
    for part in parts:
        for canonical, spec in SPECS.items():
            if _key(part) in (_key(canonical),) + spec.aliases:
                return canonical, entry
    raise errors.UserError(f"--data {entry}: no benchmark name in the path; write NAME=PATH with NAME one of "
                           f"{', '.join(SPECS)}")


def load(name: str, path: str) -> Benchmark:
    spec = SPECS[name]
    return Benchmark(name=name, domain=spec.domain, kind=spec.kind, items=tuple(spec.load(path, name)))
