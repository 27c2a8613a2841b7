"""User errors: mistakes in the command line, the config or the input files, and the checks that find
them before a run builds (or creates) anything.

The command-line tools end a `UserError` with one line on stderr, naming the file or field and what to
do, and exit code 2; `--debug` (or MASA_JAX_DEBUG=1) prints the traceback too. Any other exception is a
bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import traceback
from typing import Callable, Sequence

from masa_jax import fs

EXIT_CODE = 2


class UserError(ValueError):
    """A mistake the user can fix. A ValueError, so callers that caught the checks' former
    ValueErrors still do."""


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_cli(main: Callable, define_flags: Callable) -> None:
    """`absl.app.run(main)` with the flags of `define_flags` and --debug; a UserError (also one raised
    while parsing the flags) ends the process with one line and exit code 2."""
    from absl import app, flags
    define_flags()
    flags.DEFINE_boolean("debug", False, "show the traceback of a user error (also MASA_JAX_DEBUG=1)")
    try:
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        if os.environ.get("MASA_JAX_DEBUG") == "1" or (flags.FLAGS.is_parsed() and flags.FLAGS.debug) \
                or "--debug" in sys.argv:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_CODE)


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # bad value, missing required flag, unknown flag
        raise UserError(f"{_without_traceback(str(e))} (--helpshort lists the flags)") from e
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.<field> the config does not have
        raise UserError(_unknown_field_message(e, argv)) from e


def _without_traceback(message: str) -> str:
    """ml_collections puts a config file's whole traceback into its flag error: keep only the exception line."""
    head, sep, trace = message.partition("Traceback (most recent call last):")
    if not sep:
        return message
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return head.rstrip() + " " + (lines[-1] if lines else "")


def _unknown_field_message(e: BaseException, argv: Sequence[str]) -> str:
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError("'lrr'\nDid you mean ..."))
        e = e.args[0]
    key, _, hint = (str(e.args[0]) if e.args else str(e)).partition("\n")
    key = key.strip("'\"")
    names = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    name = next((n for n in names if key in n.split(".")), f"config...{key}")
    return f"unknown config field {name}" + (f" ({hint.strip()})" if hint.strip() else "") + \
        ": the fields are those of masa_jax/config.py"


def config_from_flags(F):
    """The --config ConfigDict; a config file that does not load is a UserError."""
    try:
        config = F.config
        config.to_dict()  # ml_collections defers a load failure to the first use
        return config
    except OSError as e:
        path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
        if path and not os.path.isfile(path):
            raise UserError(f"config file {path} does not exist: pass --config=configs/<name>.py") from e
        raise UserError(f"config file {path} does not load: {e.__cause__ or e}") from e


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """The run directory is a directory we can create and write (read-only mounts, /proc, a file in the
    way); what the check creates it removes again."""
    if fs.isfile(workdir):
        raise UserError(f"{flag} {workdir} is a file, not a directory: pass a new or an existing run directory")
    if fs.is_remote(workdir):
        return  # an object store: the first write tells
    path, created = os.path.abspath(workdir), None
    while not os.path.lexists(path):
        path, created = os.path.dirname(path), path
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise UserError(f"{flag} {workdir} cannot be written ({e.strerror or e}): pass a writable directory") from e
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)


def is_hf_dir(path: str) -> bool:
    """An HF model directory (local or remote): config.json and the safetensors weights (one file or an index)."""
    has = lambda name: fs.isfile(fs.join(path, name))
    return has("config.json") and (has("model.safetensors") or has("model.safetensors.index.json"))


def check_model_dir(config, weights: bool = True) -> None:
    """The HF directory of config.model.path (`weights`: the run loads them) and the tokenizer's directory."""
    for field in (("model.path",) if weights else ()) + ("model.tokenizer_path",):
        path = config[field]
        if not path or not fs.isdir(path):
            raise UserError(f"config.{field} {path!r} is not a directory: set --config.{field} to an HF model "
                            "directory, local or gs:// (config.json, *.safetensors, tokenizer files)")
    if weights and not is_hf_dir(config.model.path):
        raise UserError(f"config.model.path {config.model.path!r} has no config.json or model.safetensors"
                        "[.index.json]: set --config.model.path to an HF model directory")
    if weights:
        check_hf_weights(config.model.path, "config.model.path")
    check_tokenizer(config.model.tokenizer_path, "config.model.tokenizer_path")


def check_hf_weights(path: str, field: str) -> None:
    """config.json, every weight file's header and every tensor's shape against the config, as
    `from_pretrained` will check them, before anything is built (no tensor data is read). A remote
    directory is checked once its local copy is made."""
    if fs.is_remote(path):
        return
    from masa_jax.models import qwen
    try:
        qwen.check_checkpoint(path)
    except (qwen.CheckpointError, qwen.UnsupportedConfigError, OSError) as e:
        raise UserError(f"{field} {path}: {one_line(e)}: fix or replace the model directory") from e
    except (KeyError, TypeError, ValueError) as e:  # a config.json field missing or of the wrong type
        raise UserError(f"{field} {path}: config.json does not describe a Qwen model "
                        f"({type(e).__name__}: {one_line(e)})") from e


def check_tokenizer(path: str, field: str) -> None:
    """The tokenizer loads (transformers' errors for a missing tokenizer.json name a package to install)."""
    if fs.is_remote(path):
        return
    names = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise UserError(f"{field} {path} has no tokenizer (tokenizer.json): copy the tokenizer files of the base "
                        f"model there, or set --{field.removeprefix('config.')} to the directory that has them")
    from masa_jax.tokenization import load_codec
    try:
        load_codec(path)
    except Exception as e:  # noqa: BLE001  (transformers raises anything from OSError to KeyError)
        raise UserError(f"{field} {path}: the tokenizer does not load ({type(e).__name__}: {one_line(e)})") from e


def check_data_file_names(specs: Sequence[str], *, field: str = "config.data.train_files") -> None:
    """Every entry names something and every data file exists (cheap: nothing is parsed, so a pod's
    hosts do not each read the whole dataset before loading their shares). Generated (toy) and TFDS specs are
    made / fetched by name and checked when loaded."""
    from masa_jax.data import sources
    for spec in specs:
        if not spec:
            raise UserError(f"{field} has an empty entry: name the data files (verl parquet, JSONL, tfds:<name>)")
        if not sources.is_named_source(spec) and not fs.isfile(spec):
            raise UserError(f"data file {spec} does not exist: fix {field}")
        if spec.startswith("tfds:") and importlib.util.find_spec("tensorflow_datasets") is None:
            raise UserError(f"{field} {spec} needs tensorflow-datasets: pip install 'masa_jax[tfds]' "
                            "(no TensorFlow needed)")


@contextlib.contextmanager
def data_file_errors(spec: str, *, field: str = "config.data.train_files", skip_hint: str = ""):
    """Turns what reading `spec` raises (a malformed row, an unreadable file) into one-line UserErrors
    naming the file (and the row and field, for a malformed row)."""
    from masa_jax.data import sources
    try:
        yield
    except sources.DataError as e:  # the message names the file, row and field
        raise UserError(f"{e}: fix the row{skip_hint}") from e
    except UserError:
        raise
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid (truncated parquet) is a ValueError
        raise UserError(f"data file {spec} cannot be read ({one_line(e)}): replace it or fix {field}") from e


def no_problems(spec: str, field: str = "config.data.train_files") -> UserError:
    return UserError(f"data file {spec} holds no problems: fill it or remove it from {field}")


def check_data_files(specs: Sequence[str], *, on_error: str = "raise", field: str = "config.data.train_files",
                     skip_hint: str = "") -> None:
    """Reads every data file, so that a missing, empty or malformed one stops a command before it builds
    the model or writes anything (`evaluate`, which reads them all anyway)."""
    from masa_jax.data import sources
    check_data_file_names(specs, field=field)
    for spec in specs:
        if sources.is_named_source(spec):
            continue
        with data_file_errors(spec, field=field, skip_hint=skip_hint):
            loaded = sources.load_problems(spec, on_error=on_error)
        if not loaded.problems:
            raise no_problems(spec, field)
