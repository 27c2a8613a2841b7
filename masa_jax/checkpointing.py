"""Orbax checkpoints of a whole run: the train-state pytree plus small JSON extras.

One checkpoint step directory holds two items:

- ``state``: a pytree of ``jax.Array`` (params, optimizer state, step, rng — possibly sharded over
  a multi-host mesh), written with ``StandardSave`` (tensorstore / OCDBT; each host writes its
  shards);
- ``extras``: a JSON-serialisable dict (data-iterator state, expert buffer, metric history, ...),
  written with ``JsonSave`` by the primary host.

Conventions the trainer relies on
---------------------------------
- ``step`` is the number of RL steps *completed*; the checkpoint at step s holds the state after
  step s, so a resumed run continues with step s + 1 (the number ``metrics.MetricsWriter`` logs).
- Saving cadence is decided by the manager: ``save(step, ...)`` writes only when
  ``step % save_interval_steps == 0`` (or on a JAX preemption sync point on TPU pods), unless
  ``force=True`` (pre-emption, end of run). Call ``should_save(step)`` first to skip building the
  extras on steps that will not be written.
- Saves are asynchronous: ``save`` returns once the arrays are copied off the device (it is then
  safe to donate or delete them), files are written in a background thread. ``wait()`` blocks
  until the write is durable; ``close()`` waits too — call it before the process exits.
- Every method is a collective in multi-host runs: call it on all hosts, in the same order.

Atomicity (orbax 0.12.8, verified): on POSIX file systems a step is written under
``<step>.orbax-checkpoint-tmp-<timestamp>/`` and renamed to ``<step>/`` only when every item is
committed; on GCS a ``commit_success.txt`` marks the finished step. Orbax's step listing ignores
unfinished steps, so a crash mid-save leaves nothing that ``restore_latest`` would pick; leftover
temporary directories are removed when the next ``RunCheckpointer`` opens the directory.

That does not protect against damage *after* the commit (a truncated or deleted file on a flaky
disk). ``restore_latest`` therefore tries the steps newest first; an unreadable step is logged with
a WARNING, moved to ``<directory>/corrupt/`` (so the resumed run can save that step number
again), and the previous step is used. Keep ``max_to_keep >= 2`` so there is a previous step to fall back to.

``PreemptionGuard`` turns SIGTERM (TPU pre-emption notice) into a flag the loop polls, so the loop
can save and exit cleanly instead of dying mid-step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from masa_jax import errors, fs

logger = logging.getLogger(__name__)

_STATE = "state"
_EXTRAS = "extras"
_CORRUPT_DIR = "corrupt"


class CheckpointError(errors.UserError):
    """Raised when checkpoints exist but none of them can be restored."""


class CheckpointWriteError(errors.UserError):
    """A checkpoint could not be written (disk full, permissions, a lost bucket). The steps committed
    before it are intact: the run resumes from the newest of them once the storage is fixed."""


def abstract_state(template: Any, shardings: Any = None) -> Any:
    """Returns the restore target: a pytree of ``jax.ShapeDtypeStruct`` with shardings.

    ``template`` is the train state (concrete arrays, e.g. freshly initialised, or already abstract
    ``ShapeDtypeStruct``s / ``jax.eval_shape`` output). ``shardings`` is a pytree of ``Sharding``
    with the same structure, one per leaf; when None, each leaf keeps its own ``.sharding`` (a
    concrete array's placement or the struct's sharding). Leaves without any sharding land on the
    default device. The saved layout does not matter: orbax reshards on restore.
    """
    if shardings is None:
        return jax.tree.map(_leaf_to_struct, template)
    return jax.tree.map(lambda leaf, sharding: _leaf_to_struct(leaf, sharding), template, shardings)


def _leaf_to_struct(leaf: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def to_json_compatible(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Returns ``extras`` as plain JSON types (numpy / jax scalars and arrays: numbers / lists).

    Raises ``TypeError`` at the call site for anything JSON cannot hold, instead of failing later in
    the background writer thread where the error would surface one save late.
    """

    def default(obj: Any) -> Any:
        if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(obj).tolist()
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        raise TypeError(
            f"checkpoint extras: {type(obj).__name__} is not JSON-serialisable: {obj!r}")

    return json.loads(json.dumps(dict(extras), default=default))


class _QuietOrbaxFailures(logging.Filter):
    """Drops the tracebacks Orbax's save threads log (``logging.exception``, one per thread: 4-87 blocks
    for one full disk, measured) for a failure that ``RunCheckpointer`` re-raises as one
    ``CheckpointWriteError`` line anyway. ``--verbosity=1`` (DEBUG) keeps them, for debugging Orbax."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        if not (from_orbax and record.exc_info):
            return True
        return logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG


def _quiet_orbax_failures() -> None:
    absl_logger = logging.getLogger("absl")  # absl.logging (which Orbax uses) logs through this logger
    if not any(isinstance(f, _QuietOrbaxFailures) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbaxFailures())


class RunCheckpointer:
    """Saves and restores (train state, extras) under one directory with Orbax.

    Args:
      directory: where the step directories go (local path or ``gs://``).
      max_to_keep: newest steps kept; older ones are deleted after a newer one is committed.
      async_save: write in a background thread (the loop continues while files are written).
      save_interval_steps: ``save`` writes at steps that are multiples of this (see module doc).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
    ):
        if max_to_keep < 1 or save_interval_steps < 1:
            raise ValueError("need max_to_keep >= 1 and save_interval_steps >= 1, got "
                             f"{max_to_keep}, {save_interval_steps}")
        if max_to_keep < 2:
            logger.warning("max_to_keep=1: a damaged newest checkpoint has no fallback")
        self.directory = epath.Path(fs.absolute(directory))
        _quiet_orbax_failures()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            # No InitialSavePolicy: an 8B run's first-step checkpoint is ~100 GB of wasted writes.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_interval_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(max_to_keep),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(_STATE, _EXTRAS))
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._write_failed = False  # a CheckpointWriteError was raised: close() does not raise it again

    def latest_step(self) -> int | None:
        """Newest committed step, or None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, extras: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts saving ``state`` (pytree of arrays) and ``extras`` (JSON dict) as ``step``.

        Returns whether a save was started: False when the interval says no (and not ``force``), or
        when ``step`` is already on disk (e.g. the final forced save right after a periodic one).
        """
        if force and step in self._manager.all_steps():
            logger.info("checkpoint step %d already saved in %s", step, self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _EXTRAS: ocp.args.JsonSave(to_json_compatible(extras or {})),
        })
        with self._write_errors():  # also the previous asynchronous save's, which surfaces here
            saved = self._manager.save(step, args=args, force=True)
            self._in_flight = step if saved else self._in_flight
        if saved:
            logger.info("checkpoint step %d: save started in %s", step, self.directory)
        return saved

    def restore(self, step: int, template_state: Any, shardings: Any = None) -> tuple[Any, dict]:
        """Restores (state, extras) of one step onto ``shardings`` (see ``abstract_state``)."""
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state(template_state, shardings)),
            _EXTRAS: ocp.args.JsonRestore(),
        })
        restored = self._manager.restore(step, args=args)
        return restored[_STATE], dict(restored[_EXTRAS] or {})

    def restore_latest(self, template_state: Any, shardings: Any = None
                       ) -> tuple[Any, dict, int] | None:
        """Restores the newest readable checkpoint: (state, extras, step), or None if there is none.

        Steps are tried newest first. A step that fails to restore is logged (WARNING, naming its
        path) and, once an older step restored fine, moved to ``<directory>/corrupt/``. If every
        step fails, ``CheckpointError`` is raised rather than returning None: failing everywhere
        usually means the template does not match the run (e.g. a different model config), and silently
        starting from scratch would overwrite a good run.
        """
        self.wait()  # a save still in flight would otherwise be invisible or half-listed
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        failed: list[tuple[int, BaseException]] = []
        for step in steps:
            try:
                state, extras = self.restore(step, template_state, shardings)
            # Damage shows up as any of ValueError (tensorstore), OSError, JSONDecodeError,
            # KeyError (missing item): all mean "this step is unreadable", so try an older one.
            except Exception as err:  # noqa: BLE001
                failed.append((step, err))
                continue
            for bad, err in failed:  # logged once a fallback worked; else the error below says it all
                logger.warning("checkpoint step %d at %s cannot be restored (%s: %s); falling back to step %d",
                               bad, self._step_path(bad), type(err).__name__, _first_line(err), step)
            if failed:
                self._quarantine([bad for bad, _ in failed])
            logger.info("restored checkpoint step %d from %s", step, self.directory)
            return state, extras, step
        raise CheckpointError(
            f"none of the checkpoints {steps} in {self.directory} could be restored (the newest: "
            f"{type(failed[0][1]).__name__}: {_first_line(failed[0][1])[:300]}); they were written by another "
            f"model or config, or are damaged: move {self.directory} away to start afresh, or pass another --workdir"
        ) from failed[0][1]

    def wait(self) -> None:
        """Blocks until every started save is committed to storage."""
        with self._write_errors():
            self._manager.wait_until_finished()
            self._in_flight = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads. A write error it meets is raised
        as ``CheckpointWriteError`` unless one was raised already."""
        try:
            with self._write_errors():
                self._manager.close()
        except CheckpointWriteError:
            if not self._write_failed:
                raise

    @contextlib.contextmanager
    def _write_errors(self):
        """Turns what a failed write raises (Orbax re-raises a background save's error at the next call)
        into one ``CheckpointWriteError`` naming the step, the reason and the step a rerun resumes from."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:  # noqa: BLE001  (tensorstore: ValueError, the file system: OSError, ...)
            step = self._in_flight
            self._in_flight = None
            if self._write_failed:
                raise CheckpointWriteError("checkpoint writes failed before (see above)") from err
            self._write_failed = True
            text = str(err)
            reason = "no space left on device" if ("No space left" in text or "os_error_code='28'" in text) \
                else _first_line(err)[:300]
            committed = [s for s in self._committed_steps() if s != step]
            resume = (f"the newest complete checkpoint is step {committed[-1]}" if committed
                      else "no checkpoint was completed")
            raise CheckpointWriteError(
                f"checkpoint{'' if step is None else f' step {step}'} could not be written to {self.directory} "
                f"({reason}); {resume}: fix the storage and run the same command again to resume") from err

    def _committed_steps(self) -> list[int]:
        """Step directories that hold a finished checkpoint (read from the file system: the manager's
        own listing may be mid-update after a failed save)."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        except OSError:
            return []

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _quarantine(self, steps: Iterable[int]) -> None:
        """Moves unreadable steps out of orbax's view, keeping the files for a post-mortem.

        Leaving them in place would make the manager refuse to save those step numbers again.
        """
        if jax.process_index() == 0:
            corrupt_dir = self.directory / _CORRUPT_DIR
            corrupt_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = corrupt_dir / f"{step}-{int(time.time())}"
                logger.warning("moving unreadable checkpoint %s to %s", self._step_path(step),
                               target)
                self._step_path(step).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("masa_jax_checkpoint_quarantine")
        self._manager.reload()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class PreemptionGuard:
    """Context manager turning SIGTERM into a flag, so the loop can save and exit cleanly.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop:           # multi-host: guard.should_stop_all()
                    ckpt.save(step, state, extras, force=True); ckpt.wait(); break

    The previous handlers are restored on exit. Signal handlers can only be installed from the main
    thread; entering the guard elsewhere raises ``ValueError``.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._stop = threading.Event()

    def __enter__(self) -> PreemptionGuard:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if not self._stop.is_set():
            logger.warning("received %s: will save a checkpoint and stop after this step",
                           signal.Signals(signum).name)
        self._stop.set()

    def request_stop(self) -> None:
        """Sets the flag as a signal would (e.g. a wall-clock budget ran out)."""
        self._stop.set()

    @property
    def should_stop(self) -> bool:
        """Whether a stop signal reached *this* process."""
        return self._stop.is_set()

    def should_stop_all(self) -> bool:
        """Whether a stop signal reached *any* process; call it on every host each step.

        Hosts can receive SIGTERM at different steps; acting on the local flag alone would make one
        host enter the (collective) save while another starts the next step, a deadlock. This is a
        tiny all-gather, so every host decides the same at the same step.
        """
        if jax.process_count() == 1:
            return self.should_stop
        from jax.experimental import multihost_utils  # only needed on multi-host runs

        flags = multihost_utils.process_allgather(np.asarray(self.should_stop, dtype=np.int32))
        return bool(np.any(flags))


# -------- The run's config.json: what a resumed run must match ------------------------------------

# Where a run's processes meet and where they cache executables, not what they train: may differ between
# invocations and between hosts.
_PLACEMENT_FIELDS = ("mesh.coordinator_address", "mesh.process_id", "compile_cache.enabled", "compile_cache.dir",
                     "compile_cache.min_compile_time_s")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(stored: dict, config) -> list[str]:
    """'field: old -> new' for each field of `config` that differs from a stored config.json. A field the
    file lacks (added to the code since) counts only when it is set away from its default."""
    from masa_jax import config as config_lib  # the defaults of fields added since the file was written
    as_json = lambda c: _flat(json.loads(json.dumps(c.to_dict(), default=str)))
    old, default = _flat(stored), as_json(config_lib.base_config())
    return [f"{k}: {old.get(k, default.get(k))!r} -> {v!r}" for k, v in as_json(config).items()
            if k not in _PLACEMENT_FIELDS and v != old.get(k, default.get(k))]


def _stored_config(path: str) -> dict | None:
    """The config.json at `path`, None when it does not exist; an unreadable one is a UserError."""
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
        raise errors.UserError(f"{path} cannot be read ({e}): delete it, or pass --allow_config_change") from e


def check_config_change(config, workdir: str, allow: bool) -> None:
    """A workdir resumes the run its config.json describes: another config is an error unless allowed."""
    stored = None if allow else _stored_config(fs.join(workdir, "config.json"))
    changes = config_changes(stored, config) if stored is not None else []
    if changes:
        raise errors.UserError(f"{workdir} holds a run with another config: {', '.join(changes)}; pass "
                               "--allow_config_change to resume it with the new one, or use another --workdir")


def write_config(config, workdir: str) -> None:
    """Writes config.json; a differing one from an earlier invocation is kept as config.<n>.json."""
    path = fs.join(workdir, "config.json")
    try:
        keep = (stored := _stored_config(path)) is not None and bool(config_changes(stored, config))
    except errors.UserError:  # unreadable: keep it too
        keep = True
    if keep:
        n = 1
        while fs.exists(fs.join(workdir, f"config.{n}.json")):
            n += 1
        fs.replace(path, fs.join(workdir, f"config.{n}.json"))
    # Atomic: other hosts may be reading it in check_config_change.
    fs.write_text(path, json.dumps(config.to_dict(), indent=2, default=str))
