"""Problem sources: verl-style parquet, JSONL and TFDS, all yielding `Problem` records.

Every loader returns a `Loaded` result: the problems in file order plus one message per skipped
row. Malformed rows raise `DataError` (a `ValueError`) naming the file, the row and the field, e.g.

    ValueError: data/train.parquet row 17: field reward_model.ground_truth.target: missing

unless the caller passes `on_error="skip"`, in which case the row is left out and its message is
kept in `Loaded.skipped` so the trainer can log the count. Nothing is dropped silently.

Formats (details in each loader's docstring):
  * verl parquet: `reward_model.ground_truth.{question, solution, target}` as nested structs, JSON
    strings or Python-literal strings (read with `ast.literal_eval`, never `eval`). A row without
    `ground_truth.question` takes the last user message of `prompt` as its question (minus a known
    trailing verl instruction). A plain-string ground_truth is the target itself (verl GSM8K).
  * JSONL: one object per line with `problem`, `answer`, optional `solution`, `id`, `level`.
  * TFDS: "tfds:<name>[:<split>]" through `tfds.data_source` (extra `masa_jax[tfds]`).
  * generated sources, "<prefix>:<args>": problems made, not read. A package declares its prefixes
    under the entry-point group `masa_jax.sources` (setup.py: the toy world's "toy:<n>[:<mix>]" and
    "toy-heldout:<n>[:<seed>]", `masa_jax.toy.world.load_spec`), or calls `register_source`; this
    module knows none of them by name.

Files are read through `masa_jax.fs` (epath), so they may be local or gs://. This module imports
neither jax nor TensorFlow; pyarrow and tensorflow_datasets are imported only by the loaders that
need them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.metadata
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from masa_jax import fs
from masa_jax.data.problem import Problem  # noqa: F401  (re-exported: sources.Problem)

OnError = Literal["raise", "skip"]

ENTRY_POINT_GROUP = "masa_jax.sources"

# Instructions that verl preprocessing scripts append to the user message. When a row has no
# `ground_truth.question` the question falls back to the last user message, and these suffixes are
# stripped so that the meta prompt and the notion exclusion see only the problem itself.
KNOWN_INSTRUCTION_SUFFIXES: tuple[str, ...] = (
    "Let's think step by step and output the final answer within \\boxed{}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Result of a loader: `problems` in source order and `skipped`, one message per dropped row."""

    problems: tuple[Problem, ...]
    skipped: tuple[str, ...] = ()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class DataError(ValueError):
    """A malformed row; the message is '<source> row <row>: field <field>: <reason>'."""

    def __init__(self, source: str, row: int, field: str, reason: str):
        super().__init__(f"{source} row {row}: field {field}: {reason}")
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason


class _FieldError(Exception):
    """Raised inside row parsers; turned into a DataError once the row is known."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- field helpers


def _parse_container(value: str, field: str) -> Any:
    """Parses a string holding a JSON or Python-literal container (dict / list).

    verl files written by different scripts store nested fields as JSON (`{"a": "b"}`) or as the
    `repr` of a Python object (`{'a': 'b'}`); `ast.literal_eval` reads the latter safely (it only
    accepts literals, never executes code).
    """
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise _FieldError(field, f"not a JSON or Python-literal value ({type(e).__name__})") from None


def _as_mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        raise _FieldError(field, "missing")
    if isinstance(value, str):
        value = _parse_container(value, field)
    if not isinstance(value, Mapping):
        raise _FieldError(field, f"expected a mapping, got {type(value).__name__}")
    return value


def _as_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    """A required string field. Integers and finite floats are accepted as answers (JSONL `42`)."""
    if value is None:
        raise _FieldError(field, "missing")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _FieldError(field, "bytes are not valid UTF-8") from None
    elif isinstance(value, bool):
        raise _FieldError(field, "expected a string, got bool")
    elif isinstance(value, int):
        value = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _FieldError(field, f"non-finite number {value}")
        value = repr(value)
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _FieldError(field, "empty")
    return value


def _optional_text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    text = _as_text(value, field, allow_empty=True)
    return text if text.strip() else None


def _strip_instruction(text: str) -> str:
    stripped = text.rstrip()
    for suffix in KNOWN_INSTRUCTION_SUFFIXES:
        if stripped.endswith(suffix):
            return stripped[: -len(suffix)].rstrip()
    return text


_LEVEL_RE = re.compile(r"(-?\d+)")
# A string that starts like a dict with a quoted key: '{"target": ...' or "{'question': ...".
_STRUCT_START = re.compile(r"""^\s*\{\s*["'][A-Za-z_]\w*["']\s*:""")


def _difficulty_of(level: Any) -> int | None:
    """MATH's `level` column ("Level 3") as an int; None when absent or not a number ("Level ?")."""
    if isinstance(level, bool) or level is None:
        return None
    if isinstance(level, int):
        return level
    if isinstance(level, bytes):
        level = level.decode("utf-8", errors="replace")
    if isinstance(level, str):
        m = _LEVEL_RE.search(level)
        return int(m.group(1)) if m else None
    return None


def _collect(
    rows: Iterable[tuple[int, Callable[[], Problem]]], source: str, on_error: OnError
) -> Loaded:
    """Runs the per-row parsers, raising or recording `DataError`s according to `on_error`."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    problems: list[Problem] = []
    skipped: list[str] = []
    for row, parse in rows:
        try:
            problems.append(parse())
        except _FieldError as e:
            err = DataError(source, row, e.field, e.reason)
            if on_error == "raise":
                raise err from None
            skipped.append(str(err))
        except DataError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
    return Loaded(tuple(problems), tuple(skipped))


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".parquet", ".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


# --------------------------------------------------------------------------- verl parquet


def _verl_question(record: Mapping[str, Any], gt: Mapping[str, Any] | None) -> str:
    if gt is not None and gt.get("question") is not None:
        # The authors' DeepScaleR rows repeat the instruction here too (data/deepscaler/train_example.json).
        return _strip_instruction(_as_text(gt["question"], "reward_model.ground_truth.question"))
    # Fallback documented in `verl_row_to_problem`: the last user message of the chat prompt.
    prompt = record.get("prompt")
    if prompt is None:
        raise _FieldError("reward_model.ground_truth.question", "missing (and no prompt to fall back to)")
    if isinstance(prompt, str):
        prompt = _parse_container(prompt, "prompt")
    if not isinstance(prompt, (list, tuple)):
        # pandas hands nested lists over as numpy arrays; accept any sequence that is not a string.
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        else:
            raise _FieldError("prompt", f"expected a list of messages, got {type(prompt).__name__}")
    for i in range(len(prompt) - 1, -1, -1):
        message = prompt[i]
        if not isinstance(message, Mapping):
            raise _FieldError(f"prompt[{i}]", f"expected a message mapping, got {type(message).__name__}")
        if message.get("role") == "user":
            return _strip_instruction(_as_text(message.get("content"), f"prompt[{i}].content"))
    raise _FieldError("prompt", "no user message (needed because ground_truth.question is missing)")


def verl_row_to_problem(record: Mapping[str, Any], *, source: str, row: int, uid: str) -> Problem:
    """Converts one verl record (a dict as read from parquet) to a `Problem`.

    Reads `reward_model.ground_truth.{question, solution, target}`. `reward_model` and
    `ground_truth` may be nested structs, JSON strings or Python-literal strings. A `ground_truth`
    that is a plain string which does not parse to a mapping (verl's GSM8K / DeepScaleR files store
    just the answer there) is the target itself, with no question or solution.
    When `ground_truth.question` is missing, the question is the content of the last `user` message
    of `prompt`, with a known trailing verl instruction ("Let's think step by step and output the
    final answer within \\boxed{}.") removed. The MATH `level` column sets `difficulty`.
    Raises `DataError` for a missing / malformed field.
    """
    try:
        rm = _as_mapping(record.get("reward_model"), "reward_model")
        raw_gt = rm.get("ground_truth")
        if raw_gt is None:
            raise _FieldError("reward_model.ground_truth", "missing")
        gt: Mapping[str, Any] | None
        if isinstance(raw_gt, Mapping):
            gt = raw_gt
        elif isinstance(raw_gt, str):
            parsed: Any = None
            if raw_gt.lstrip().startswith("{"):
                try:
                    parsed = _parse_container(raw_gt, "reward_model.ground_truth")
                except _FieldError:
                    # "{A,D}" or "{1,2}" is an answer; "{'target': ..." that fails to parse is a
                    # broken struct and must not be taken for an answer.
                    if _STRUCT_START.match(raw_gt):
                        raise
            gt = parsed if isinstance(parsed, Mapping) else None
        else:
            raise _FieldError(
                "reward_model.ground_truth", f"expected a mapping or string, got {type(raw_gt).__name__}"
            )
        if gt is None:
            answer = _as_text(raw_gt, "reward_model.ground_truth")
            solution = None
        else:
            answer = _as_text(gt.get("target"), "reward_model.ground_truth.target")
            solution = _optional_text(gt.get("solution"), "reward_model.ground_truth.solution")
        question = _verl_question(record, gt)
    except _FieldError as e:
        raise DataError(source, row, e.field, e.reason) from None
    return Problem(
        uid=uid,
        question=question,
        answer=answer.strip(),
        solution=solution,
        source=source,
        row=row,
        difficulty=_difficulty_of(record.get("level")),
    )


def load_verl_parquet(path: str | os.PathLike[str], *, on_error: OnError = "raise") -> Loaded:
    """Reads a verl-format parquet file (columns `prompt`, `reward_model`, optional `level`).

    Returns `Loaded` with one `Problem` per row (uid "<stem>:<row>"); see `verl_row_to_problem` for
    the accepted layouts. Raises `DataError` on a malformed row unless on_error="skip".
    """
    import pyarrow.parquet as pq  # lazy: keeps `import masa_jax.data` light

    path = os.fspath(path)
    with fs.open(path, "rb") as f:  # a file object: pyarrow alone would not find a gs:// file
        schema_names = set(pq.read_schema(f).names)
        if "reward_model" not in schema_names:
            raise DataError(path, 0, "reward_model", "missing column")
        columns = [c for c in ("prompt", "reward_model", "level") if c in schema_names]
        f.seek(0)
        records = pq.read_table(f, columns=columns).to_pylist()
    stem = _stem(path)

    def rows() -> Iterable[tuple[int, Callable[[], Problem]]]:
        for i, rec in enumerate(records):
            yield i, (lambda rec=rec, i=i: verl_row_to_problem(rec, source=path, row=i, uid=f"{stem}:{i}"))

    return _collect(rows(), path, on_error)


# --------------------------------------------------------------------------- JSONL

# Accepted key names, first match wins. The canonical ones are `problem` / `answer`.
QUESTION_KEYS: tuple[str, ...] = ("problem", "question")
ANSWER_KEYS: tuple[str, ...] = ("answer", "target")


def _first_key(record: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any]:
    for k in keys:
        if k in record and record[k] is not None:
            return k, record[k]
    return keys[0], None


def dict_to_problem(
    record: Mapping[str, Any],
    *,
    source: str,
    row: int,
    uid_prefix: str,
    question_keys: Sequence[str] = QUESTION_KEYS,
    answer_keys: Sequence[str] = ANSWER_KEYS,
    solution_key: str = "solution",
) -> Problem:
    """A flat record {problem, answer, solution?, id?, level?} -> `Problem`.

    uid is "<uid_prefix>:<id>" when the record has an `id`, else "<uid_prefix>:<row>".
    Raises `DataError` for a missing / malformed field.
    """
    try:
        qk, q = _first_key(record, question_keys)
        ak, a = _first_key(record, answer_keys)
        question = _strip_instruction(_as_text(q, qk))
        answer = _as_text(a, ak).strip()
        solution = _optional_text(record.get(solution_key), solution_key)
        rid = record.get("id")
        if isinstance(rid, bytes):
            rid = _as_text(rid, "id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise _FieldError("id", f"expected a string or integer, got {type(rid).__name__}")
    except _FieldError as e:
        raise DataError(source, row, e.field, e.reason) from None
    uid = f"{uid_prefix}:{rid if rid is not None else row}"
    return Problem(
        uid=uid,
        question=question,
        answer=answer,
        solution=solution,
        source=source,
        row=row,
        difficulty=_difficulty_of(record.get("level")),
    )


def host_block(num_rows: int, process_index: int, process_count: int) -> range:
    """Host `process_index`'s rows of a source of `num_rows` rows: the contiguous block
    [h * N // P, (h + 1) * N // P). The blocks of all hosts partition range(N), in order, and their
    sizes differ by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return range(process_index * num_rows // process_count, (process_index + 1) * num_rows // process_count)


def load_jsonl(path: str | os.PathLike[str], *, on_error: OnError = "raise",
               shard: tuple[int, int] = (0, 1)) -> Loaded:
    """Reads a JSONL file with one object per line: `problem`, `answer`, optional `solution`, `id`.

    `question` / `target` are accepted as aliases of `problem` / `answer`. `row` is the 0-based line
    index (blank lines are counted but yield nothing), so "row 17" is line 18 of the file.
    shard (host, hosts): parse only that host's `host_block` of the non-blank lines.
    Raises `DataError` on a malformed line unless on_error="skip".
    """
    path = os.fspath(path)
    stem = _stem(path)
    with fs.open(path, "rb") as f:  # decoded line by line, so bad UTF-8 is a DataError naming its row
        lines = f.read().split(b"\n")

    def parse(i: int, raw: bytes) -> Problem:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _FieldError("(line)", f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise _FieldError("(line)", f"invalid JSON: {e}") from None
        if not isinstance(record, Mapping):
            raise _FieldError("(line)", f"expected a JSON object, got {type(record).__name__}")
        return dict_to_problem(record, source=path, row=i, uid_prefix=stem)

    records = [i for i, line in enumerate(lines) if line.strip()]
    block = host_block(len(records), *shard)
    return _collect(((i, (lambda i=i: parse(i, lines[i]))) for i in records[block.start:block.stop]), path,
                    on_error)


# --------------------------------------------------------------------------- TFDS

_TFDS_MISSING = (
    "TFDS sources need tensorflow-datasets, which is not installed. Install the optional extra: "
    "pip install 'masa_jax[tfds]' (no TensorFlow is needed: masa_jax reads TFDS through "
    "tfds.data_source)."
)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(_TFDS_MISSING) from e
    return tfds


def _plain(value: Any) -> Any:
    """TFDS data sources return numpy scalars / 0-d arrays; turn them into Python values."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _tfds_not_found_error(tfds: Any) -> type[BaseException] | tuple[()]:
    """tfds' DatasetNotFoundError (tensorflow_datasets.core.registered), or () where a version lacks it."""
    registered = getattr(getattr(tfds, "core", None), "registered", None)
    return getattr(registered, "DatasetNotFoundError", ())


def unknown_tfds_message(name: str, known: Iterable[str]) -> str:
    """One line for a TFDS name that is not registered: the three closest registered names (difflib)."""
    base = name.split(":")[0].split("/")[0]
    closest = difflib.get_close_matches(base, sorted(set(known)), n=3, cutoff=0.0)
    return (f"TFDS has no dataset {base!r}; closest registered names: {', '.join(closest) or '(none)'} "
            "(a dataset prepared outside the registry is found through config.data.tfds_data_dir / $TFDS_DATA_DIR)")


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    download: bool = False,
    question_key: str | Sequence[str] = QUESTION_KEYS,
    answer_key: str | Sequence[str] = ANSWER_KEYS,
    solution_key: str = "solution",
    on_error: OnError = "raise",
    shard: tuple[int, int] = (0, 1),
) -> Loaded:
    """Reads a TFDS dataset through `tfds.data_source` (random access, no TensorFlow).

    Each element must be a mapping with a question, an answer and optionally a solution / id
    (bytes are decoded as UTF-8). uid is "<name>/<split>:<row>". `download` defaults to False so a
    multi-host job never races to download; prepare the dataset beforehand. `data_dir` None is TFDS's
    default: $TFDS_DATA_DIR, else ~/tensorflow_datasets. An unregistered name is a one-line ValueError
    naming the three closest registered names.
    Raises ImportError with install instructions when tensorflow-datasets is missing.
    """
    tfds = _import_tfds()
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except _tfds_not_found_error(tfds) as e:  # its message lists every registered dataset (~5,000 chars)
        raise ValueError(unknown_tfds_message(name, tfds.list_builders())) from e
    except ValueError as e:  # e.g. "file format is not set": the dataset was never prepared under that directory
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        reason = " ".join(str(e).split())
        raise ValueError(f"TFDS dataset {name!r} in {where}: {reason} (is it prepared there? `tfds build` it, or set "
                         "config.data.tfds_data_dir / $TFDS_DATA_DIR to the directory that holds it)") from e
    source = f"tfds:{name}/{split}"
    qkeys = (question_key,) if isinstance(question_key, str) else tuple(question_key)
    akeys = (answer_key,) if isinstance(answer_key, str) else tuple(answer_key)

    def parse(i: int) -> Problem:
        element = ds[i]
        if not isinstance(element, Mapping):
            raise _FieldError("(element)", f"expected a mapping, got {type(element).__name__}")
        record = {k: _plain(v) for k, v in element.items()}
        return dict_to_problem(
            record,
            source=source,
            row=i,
            uid_prefix=f"{name}/{split}",
            question_keys=qkeys,
            answer_keys=akeys,
            solution_key=solution_key,
        )

    # shard (host, hosts): only that host's `host_block` of elements is read (random access).
    return _collect(((i, (lambda i=i: parse(i))) for i in host_block(len(ds), *shard)), source, on_error)


# --------------------------------------------------------------------------- dispatch


# Generated sources by spec prefix: "toy" -> a function "toy:<args>" -> problems. Filled from the
# entry points on first use (the package that owns a source registers it, so this module imports no
# world of its own) and by `register_source`.
_GENERATORS: dict[str, Callable[[str], Sequence[Problem]]] = {}
_ENTRY_POINTS_READ = False


def register_source(prefix: str, generate: Callable[[str], Sequence[Problem]]) -> None:
    """Makes "<prefix>:<args>" specs load as `generate(spec)` (a list of Problems, deterministic in the
    spec, so every host generates the same problems and takes its own share)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", prefix) or prefix in ("tfds", "gs", "s3", "http", "https", "file"):
        raise ValueError(f"bad source prefix {prefix!r}: lower-case letters, digits, '-' and '_', not a URL scheme")
    _GENERATORS[prefix] = generate


def _read_entry_points() -> None:
    global _ENTRY_POINTS_READ
    if _ENTRY_POINTS_READ:
        return
    _ENTRY_POINTS_READ = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _GENERATORS:  # run-time registrations win over installed ones
            _GENERATORS[ep.name] = lambda spec, ep=ep: ep.load()(spec)


def generator_for(spec: str) -> Callable[[str], Sequence[Problem]] | None:
    """The registered generator for `spec`'s prefix ("toy:4096" -> the toy world's), or None when
    `spec` names a file or a TFDS dataset."""
    prefix, sep, _ = spec.partition(":")
    if not sep:
        return None
    _read_entry_points()
    return _GENERATORS.get(prefix)


def is_named_source(spec: str) -> bool:
    """Whether `spec` names a generated or TFDS source (checked when loaded) rather than a file."""
    return spec.startswith("tfds:") or generator_for(spec) is not None


# "tfds:<name>[/<config>][:<x.y.z>][:<split>]"; the split may itself hold ':' ("train[:10%]").
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


def load_problems(
    spec: str | os.PathLike[str], *, on_error: OnError = "raise", split: str = "train", **tfds_kwargs: Any
) -> Loaded:
    """Loads problems from `spec`: a `.parquet` (verl), a `.jsonl` file, "tfds:<name>[:<split>]", or a
    generated source ("<prefix>:<args>", see `register_source`; e.g. the toy world's "toy:<n>[:<mix>]"
    with seed 0 and "toy-heldout:<n>[:<seed>]").

    For TFDS the name may carry a config and version ("tfds:math/algebra:1.0.0:test"); `split` is
    used when the spec names none, and `tfds_kwargs` go to `load_tfds`. Raises ValueError for an
    unknown kind.
    """
    spec = os.fspath(spec)
    generate = generator_for(spec)
    if generate is not None:
        return Loaded(tuple(generate(spec)))
    if spec.startswith("tfds:"):
        m = _TFDS_SPEC.match(spec)
        if not m:
            raise ValueError(f"bad TFDS spec {spec!r}: expected tfds:<name>[:<split>]")
        return load_tfds(m.group("name"), split=m.group("split") or split, on_error=on_error, **tfds_kwargs)
    if spec.endswith(".parquet"):
        return load_verl_parquet(spec, on_error=on_error)
    if spec.endswith(".jsonl"):
        return load_jsonl(spec, on_error=on_error)
    raise ValueError(f"don't know how to read {spec!r}: expected {expected_kinds()}")


def expected_kinds() -> str:
    """What a data spec may be, for error messages: the file kinds, TFDS and the registered prefixes."""
    _read_entry_points()
    if not _GENERATORS:  # run from a source tree that was never installed: no entry points
        return ("*.parquet, *.jsonl or tfds:<name> (no generated sources such as toy:<n> are registered: "
                "`pip install -e .` registers masa_jax's)")
    generated = "".join(f", {prefix}:..." for prefix in sorted(_GENERATORS))
    return f"*.parquet, *.jsonl, tfds:<name>{generated}"


def load_all(specs: Iterable[str | os.PathLike[str]], *, on_error: OnError = "raise", **kwargs: Any) -> Loaded:
    """Loads and concatenates several sources (the config's `data.train_files`), in order.

    Raises ValueError when two sources produce the same uid (e.g. two files named train.parquet),
    since uids key per-problem statistics. Empty strings in `specs` are ignored.
    """
    problems: list[Problem] = []
    skipped: list[str] = []
    for spec in specs:
        if not os.fspath(spec):
            continue
        loaded = load_problems(spec, on_error=on_error, **kwargs)
        problems.extend(loaded.problems)
        skipped.extend(loaded.skipped)
    seen: dict[str, str] = {}
    for p in problems:
        if p.uid in seen:
            raise ValueError(f"duplicate uid {p.uid!r} from {seen[p.uid]} and {p.source}; rename one file")
        seen[p.uid] = p.source
    return Loaded(tuple(problems), tuple(skipped))


def filter_overlong(
    problems: Iterable[Problem], length_fn: Callable[[Problem], int], max_prompt_length: int
) -> tuple[list[Problem], int]:
    """Drops problems whose prompt is longer than `max_prompt_length` tokens.

    `length_fn(problem)` returns the token length of the longest prompt the trainer will build for
    it (e.g. max of the meta and the solution prompt, chat template included). Returns the kept
    problems in order and the number dropped (the trainer logs it).
    """
    kept: list[Problem] = []
    dropped = 0
    for p in problems:
        if length_fn(p) <= max_prompt_length:
            kept.append(p)
        else:
            dropped += 1
    return kept, dropped
