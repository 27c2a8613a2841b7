"""Observability: a JSONL metric log, TensorBoard / W&B scalars, a console bar, figures, statistics.

Metric records
--------------
One record per RL step: ``{"step": s, "<group>/<name>": value, ...}`` where ``step`` is the number
of steps *completed* (the same number ``checkpointing.RunCheckpointer`` saves under), so the first
logged step of a run is 1 and a run resumed from the checkpoint at step s logs s + 1 next. Values
are plain JSON: numpy / jax scalars become numbers, small arrays lists, and NaN / ±inf become
``null``.

Keys this module reads by name (the trainer should emit them, as fractions in [0, 1] where noted):

==============================  ===============================================================
``reward/solution_mean``        mean solution reward of the step's rollouts
``acc/solution``                fraction of correct solution rollouts                (fraction)
``reward/meta_total``           mean meta (self-alignment) reward
``reward/meta_length``          its length part
``reward/meta_difficulty``      its difficulty part
``reward/meta_notion``          its notion part
``gate/fraction``               fraction of problems whose solution rollouts were gated (fraction)
``throughput/tokens_per_s``     generated tokens per second of the whole step
``perf/rollout_tokens_per_s``   generated tokens per second of the rollout phase (``masa_jax.perf``)
``perf/update_tokens_per_s``    update tokens per second of the policy update  (``masa_jax.perf``)
``perf/mfu``                    model FLOPs utilisation of the step            (fraction)
==============================  ===============================================================

Only JAX process 0 should write (``is_primary``); the other hosts get a writer that does nothing.
Figures use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
they are safe in headless jobs and do not disturb a notebook's backend.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from masa_jax import fs
from masa_jax.stats import pass_at_k, pearson  # noqa: F401  (re-exported: metrics_lib.pearson / pass_at_k)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tb"

# (metric key, console label, formatter) for the progress bar, in display order.
PROGRESS_KEYS: tuple[tuple[str, str, str], ...] = (
    ("reward/solution_mean", "reward", "{:.3f}"),
    ("acc/solution", "acc", "{:.1%}"),
    ("reward/meta_total", "meta", "{:.3f}"),
    ("gate/fraction", "gated", "{:.0%}"),
    ("throughput/tokens_per_s", "tok/s", "{:,.0f}"),
    ("perf/rollout_tokens_per_s", "rollout tok/s", "{:,.0f}"),
    ("perf/update_tokens_per_s", "update tok/s", "{:,.0f}"),
    ("perf/mfu", "mfu", "{:.1%}"),
)
def meta_reward_keys() -> tuple[str, ...]:
    """reward/meta_total and one key per reward component (rewards/meta.py COMPONENTS)."""
    from masa_jax.rewards import meta as meta_lib
    return ("reward/meta_total", *(f"reward/meta_{name}" for name in meta_lib.component_names()))



# The metrics TensorBoard's HParams tab shows against the run's config.
HPARAM_METRICS = ("eval/accuracy", "reward/solution_mean", "acc/solution", "reward/meta_total")
def summary_keys() -> tuple[str, ...]:
    return ("reward/solution_mean", "acc/solution", *meta_reward_keys(), "gate/fraction", "throughput/tokens_per_s")


# --------------------------------------------------------------------------------------------
# JSON conversion and the JSONL file
# --------------------------------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """Returns ``value`` as plain JSON; non-finite floats become None. Never raises.

    numpy / jax scalars become Python numbers, arrays nested lists; an object JSON cannot hold is
    written as its ``str`` (a metric log must not kill a week-long run).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.generic) or hasattr(value, "__array__"):  # numpy and jax arrays
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return to_json_value(array.tolist())
        if array.dtype.kind == "V":  # ml_dtypes such as bfloat16 (kind "V") convert to float64
            try:
                return to_json_value(array.astype(np.float64).tolist())
            except (TypeError, ValueError):
                logger.debug("metric of dtype %s written as text", array.dtype)
    return str(value)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metric history: one dict per line. A missing file is an empty history.

    A line that does not parse (the half-written last line of a crashed run) is skipped with a
    WARNING rather than failing the resumed run.
    """
    path = fs.path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            logger.warning("%s:%d: skipping unparseable metric line (%s)", path, number, err)
    return records


def truncate_jsonl(path: str | os.PathLike, last_step: int | None) -> int:
    """Keeps only the records with ``step <= last_step`` (all are dropped when None).

    The file is rewritten whole (``fs.write_text``), so a crash here leaves either the old or the new
    file, never a mix. Returns the number of records kept.
    """
    records = read_jsonl(path)
    kept = [r for r in records if last_step is not None and _record_step(r) <= last_step]
    fs.write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    if len(kept) != len(records):
        logger.info("%s: dropped %d records after step %s", path, len(records) - len(kept),
                    last_step)
    return len(kept)


def _record_step(record: Mapping[str, Any]) -> float:
    step = record.get("step")
    return step if isinstance(step, (int, float)) else math.inf


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a sanitised record (what TensorBoard / W&B can plot)."""
    numbers = {k: _number(v) for k, v in record.items() if k != "step"}
    return {k: v for k, v in numbers.items() if v is not None}


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


class MetricsWriter:
    """Writes one record per step to ``workdir/metrics.jsonl``, TensorBoard and (optionally) W&B.

    Args:
      workdir: run directory; created if missing.
      use_tensorboard: also write scalars with tensorboardX to ``workdir/tb``.
      use_wandb: also log scalars to Weights & Biases (``wandb`` must be installed). The run id is
        kept in ``workdir/wandb_run_id`` so a resumed run continues the same W&B run.
      wandb_project: W&B project name.
      is_primary: whether this process writes; defaults to ``jax.process_index() == 0``.
      resume_step: if given, ``truncate_after(resume_step)`` at once. None leaves an existing file
        alone (records are appended); the trainer then calls ``truncate_after`` itself once it
        knows the step it restored — 0 for a fresh run, so stale lines of an earlier attempt that
        crashed before its first checkpoint go too.
      wandb_config: config dict recorded with the W&B run.
      hparams: the run's config (nested dicts), recorded as TensorBoard hparams (dotted keys) with
        ``HPARAM_METRICS`` as their metrics.
    """

    def __init__(self, workdir: str | os.PathLike, use_tensorboard: bool = True,
                 use_wandb: bool = False, wandb_project: str | None = None, *,
                 is_primary: bool | None = None, resume_step: int | None = None,
                 wandb_config: Mapping[str, Any] | None = None, hparams: Mapping[str, Any] | None = None):
        if is_primary is None:
            import jax  # deferred: the rest of this module does not need a JAX backend

            is_primary = jax.process_index() == 0
        self.is_primary = is_primary
        self.workdir = fs.path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.samples_path = self.workdir / SAMPLES_FILE
        self._use_tensorboard = use_tensorboard
        self._tb = None
        self._wandb_run = None
        self._hparams = dict(hparams or {})
        self._hparams_due = False  # written with the first event of each opened event file
        if not is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if use_tensorboard:
            self._tb = _open_tensorboard(self.workdir / TENSORBOARD_DIR, purge_step=None)
            self._hparams_due = bool(self._hparams)
        if use_wandb:
            self._wandb_run = _init_wandb(self.workdir, wandb_project, wandb_config)
        if resume_step is not None:
            self.truncate_after(resume_step)

    def truncate_after(self, step: int) -> None:
        """Forgets what an interrupted run logged after ``step`` (the checkpoint it resumes from).

        Drops JSONL records with a larger step and tells TensorBoard to hide its events from
        ``step + 1`` on, so a resumed run's log equals an uninterrupted run's. (W&B cannot rewind;
        see ``_init_wandb``.)
        """
        if not self.is_primary:
            return
        truncate_jsonl(self.path, step)
        if self.samples_path.exists():
            truncate_jsonl(self.samples_path, step)
        if self._use_tensorboard:
            # purge_step is only honoured when a writer opens, so reopen the writer.
            if self._tb is not None:
                self._tb.close()
            self._tb = _open_tensorboard(self.workdir / TENSORBOARD_DIR, purge_step=step + 1)
            self._hparams_due = bool(self._hparams)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Appends the record for ``step``; returns it sanitised (also on non-primary hosts)."""
        record = {"step": int(step)}
        record.update((k, v) for k, v in to_json_value(dict(metrics)).items() if k != "step")
        if not self.is_primary:
            return record
        # One line per RL step is cheap, and each line is stored when this returns (on an object store
        # the file is rewritten: no append there).
        fs.append_text(self.path, json.dumps(record, allow_nan=False) + "\n")
        scalars = _scalars(record)
        if self._board() is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=record["step"])
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=record["step"])
        return record

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars for TensorBoard / W&B only, not a metrics.jsonl record: the held-out evaluation before
        the first step (step 0), which is not an RL step (eval.jsonl keeps it)."""
        if not self.is_primary:
            return
        values = _scalars(to_json_value(dict(scalars)))
        if self._board() is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """A step's sample generations (dicts with "path": "meta" | "solution", "text", "reward", ...):
        one line each in samples.jsonl, a Markdown table per path in TensorBoard's text tab
        (``samples/<path>``) and a W&B table per path."""
        if not self.is_primary or not samples:
            return
        records = [{"step": int(step), **to_json_value(dict(r))} for r in samples]
        fs.append_text(self.samples_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        for path in dict.fromkeys(r.get("path", "") for r in records):
            rows = [r for r in records if r.get("path", "") == path]
            columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("step", "path")))
            if self._board() is not None:
                self._tb.add_text(f"samples/{path}", _markdown_table(columns, rows), global_step=int(step))
            if self._wandb_run is not None:
                import wandb  # present: the run was made with it

                data = [[json.dumps(v) if isinstance(v, (list, dict)) else v for v in (r.get(c) for c in columns)]
                        for r in rows]
                self._wandb_run.log({f"samples/{path}": wandb.Table(columns=columns, data=data)}, step=int(step))

    def _board(self) -> Any:
        """The TensorBoard writer (None: off), with the hparams written into its event file first. Not at
        open: truncate_after reopens at once, and an event file opened in the same second has the same name."""
        if self._tb is not None and self._hparams_due:
            _write_hparams(self._tb, self._hparams)
            self._hparams_due = False
        return self._tb

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (the JSONL file is never buffered)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard and W&B."""
        if self._board() is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as dotted keys with the value types TensorBoard's hparams take (others as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _write_hparams(tb: Any, config: Mapping[str, Any]) -> None:
    """The HParams plugin's experiment and session summaries, in the run's own event file, so the
    scalars logged there are the session's metrics (add_hparams would open a separate run)."""
    from tensorboardX.summary import hparams

    for summary in hparams(flat_hparams(config), {key: 0.0 for key in HPARAM_METRICS}):
        tb.file_writer.add_summary(summary)


def _markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table (TensorBoard renders text summaries as Markdown); cells on one line, pipes escaped."""
    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        for raw, escaped in (("\\", "\\\\"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"),
                             ("\n", "<br>")):  # <meta> tags would be dropped as HTML
            text = text.replace(raw, escaped)
        return text

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _open_tensorboard(logdir: epath.Path, purge_step: int | None) -> Any:
    from tensorboardX import SummaryWriter  # deferred: protobuf import is slow
    from tensorboardX import record_writer

    if fs.is_remote(logdir):  # event files through epath too, instead of tensorboardX's own GCS / S3 clients
        record_writer.register_writer_factory(os.fspath(logdir).split(":")[0], _EpathRecordWriterFactory())
    return SummaryWriter(os.fspath(logdir), purge_step=purge_step)


class _EpathRecordWriter:
    """A remote TensorBoard event file: kept in memory and written whole on each flush (an object store
    has no append), as tensorboardX's own GCS writer does."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        fs.path(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:  # no directories to make on an object store
        pass


def _init_wandb(workdir: epath.Path, project: str | None, config: Mapping[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError("use_wandb=True needs the wandb package (pip install wandb), which is "
                          "not installed; or set use_wandb=False") from err
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    # W&B drops steps below its last logged one, so after a resume the re-run steps between the
    # checkpoint and the crash keep their first values there (the JSONL file is the record).
    # W&B keeps its files in a local directory: ./wandb for a remote workdir.
    return wandb.init(project=project, dir=None if fs.is_remote(workdir) else os.fspath(workdir), id=run_id,
                      resume="allow", config=dict(config or {}))


# --------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


def _log_through_tqdm(stack: contextlib.ExitStack) -> None:
    """Routes console logging through tqdm.write until `stack` closes: the root logger's console handlers
    with tqdm's logging_redirect_tqdm, and absl's handler (not a StreamHandler, so that one leaves it
    alone) by pointing its stream at tqdm's DummyTqdmFile."""
    from tqdm.contrib import DummyTqdmFile
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    if any(_is_console(h) for h in root.handlers):  # it would add a second handler next to absl's otherwise
        stack.enter_context(logging_redirect_tqdm())
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None and absl_logging.get_absl_handler() in root.handlers:
        handler = absl_logging.get_absl_handler().python_handler
        if handler.stream in (sys.stdout, sys.stderr):
            stream = handler.stream
            handler.stream = DummyTqdmFile(stream)
            stack.callback(setattr, handler, "stream", stream)


def format_progress(metrics: Mapping[str, Any]) -> str:
    """The progress bar's postfix: the ``PROGRESS_KEYS`` present in ``metrics``, short labels."""
    parts = []
    for key, label, fmt in PROGRESS_KEYS:
        value = _number(metrics.get(key))
        if value is not None:
            parts.append(f"{label}={fmt.format(value)}")
    return " ".join(parts)


class ProgressBar:
    """A tqdm bar over RL steps: step / total, ETA, and the headline metrics of the last step.

    ``initial`` is the step the run resumes from, so the ETA counts only the steps left. While the bar
    is open, console log lines (the root logger's stderr / stdout handlers, absl's handler) are written
    through ``tqdm.write``, above the bar, instead of into it (which redrew the bar after every line).
    """

    def __init__(self, total_steps: int, initial: int = 0, *, enabled: bool = True,
                 file: Any = None):
        from tqdm.auto import tqdm  # deferred: only the trainer's console needs it

        self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                         smoothing=0.1, disable=not enabled, file=file or sys.stderr)
        self._redirect = contextlib.ExitStack()
        if enabled:
            _log_through_tqdm(self._redirect)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to ``step`` completed steps and shows ``metrics``' headline values."""
        if metrics:
            self._bar.set_postfix_str(format_progress(metrics), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Closes the bar (leaves the last line on the console) and gives the log handlers their streams back."""
        self._redirect.close()
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# History helpers and figures
# --------------------------------------------------------------------------------------------


def history_series(history: Sequence[Mapping[str, Any]], key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over a history, skipping records where it is missing or null.

    Accepts records read back from JSONL and the trainer's in-memory records alike (numpy / jax
    scalars, NaN), so end-of-run reports need not round-trip through the file.
    """
    pairs = [(_number(r.get("step")), _number(r.get(key))) for r in history]
    pairs = [(s, v) for s, v in pairs if s is not None and v is not None]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _number(value: Any) -> float | None:
    """A finite metric value as float; None for missing, null, non-finite, bool or text."""
    value = to_json_value(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: str | os.PathLike) -> epath.Path:
    path = fs.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: matplotlib would open a gs:// name as a local file
        fig.savefig(f, dpi=120, format="png")
    return path


def plot_calibration(pred_pass: Any, true_pass: Any, path: str | os.PathLike, title: str = "",
                     *, panel_titles: Sequence[str] | None = None,
                     xlabel: str = "predicted pass rate", ylabel: str = "actual pass rate",
                     lims: tuple[float, float] | None = (0.0, 1.0)) -> epath.Path:
    """Scatter of predicted vs actual pass rate with the y = x line (the paper's Figure 2).

    ``pred_pass`` / ``true_pass`` are either one 1-D array each (one panel), or equally long
    sequences of 1-D arrays — e.g. ``(pred_start, pred_end), (true_start, true_end)`` — drawn side
    by side (``panel_titles`` defaults to "start" / "end" for two panels). Each panel also shows the
    mean actual rate per predicted-rate bin and Pearson's r. ``lims=None`` scales the axes to the
    data (for predicted vs actual *length*). Returns the PNG path.
    """
    preds, trues = _as_panels(pred_pass), _as_panels(true_pass)
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predicted sets but {len(trues)} actual sets")
    if panel_titles is None:
        panel_titles = ("start", "end") if len(preds) == 2 else [""] * len(preds)
    fig, axes = _new_figure(ncols=len(preds), width=4.2, height=4.2)
    for ax, pred, true, name in zip(axes, preds, trues, panel_titles):
        if pred.shape != true.shape:
            raise ValueError(
                f"panel {name!r}: {pred.size} predictions but {true.size} actual values")
        keep = np.isfinite(pred) & np.isfinite(true)
        pred, true = pred[keep], true[keep]
        low, high = lims if lims is not None else _data_range(pred, true)
        ax.plot([low, high], [low, high], "--", color="0.5", lw=1, label="y = x")
        ax.scatter(pred, true, s=14, alpha=0.35, edgecolors="none", label="problems")
        centres, means = _binned_means(pred, true, low, high)
        ax.plot(centres, means, "o-", color="C3", ms=4, lw=1.5, label="bin mean")
        r = pearson(pred, true)
        stats = f"r = {r:.2f}, n = {pred.size}"
        ax.set_title(f"{name}  ({stats})" if name else stats)
        pad = 0.02 * (high - low)  # points on the 0 / 1 edges stay whole
        ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), xlabel=xlabel,
               ylabel=ylabel)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _as_panels(data: Any) -> list[np.ndarray]:
    """One array -> [array]; a list/tuple of 1-D arrays (possibly ragged) -> one per panel."""
    if isinstance(data, (list, tuple)) and data and np.ndim(data[0]) == 1:
        return [np.asarray(d, dtype=np.float64).ravel() for d in data]
    return [np.asarray(data, dtype=np.float64).ravel()]


def _data_range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low) or 1.0
    return low - pad, high + pad


def _binned_means(pred: np.ndarray, true: np.ndarray, low: float, high: float, bins: int = 10
                  ) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(low, high, bins + 1)
    index = np.clip(np.digitize(pred, edges) - 1, 0, bins - 1)
    filled = [b for b in range(bins) if np.any(index == b)]
    centres = np.array([(edges[b] + edges[b + 1]) / 2 for b in filled])
    means = np.array([true[index == b].mean() for b in filled])
    return centres, means


def switch_step(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The first step MASA-efficient's controls were applied (``efficient/active``), None if never."""
    steps, active = history_series(history, "efficient/active")
    on = steps[active > 0.5]
    return int(on[0]) if on.size else None


def meta_rewards_figure(history: Sequence[Mapping[str, Any]], title: str = "meta reward", *,
                        switch: int | None = None) -> Figure | None:
    """Meta reward total and its length / difficulty / notion parts over steps, the switch-over step
    (``switch``, default ``switch_step(history)``) marked; None when the history has none of
    ``meta_reward_keys()`` (e.g. a GRPO run)."""
    return _history_figure(history, meta_reward_keys(), title, "reward",
                           switch_step(history) if switch is None else switch)


def gating_figure(history: Sequence[Mapping[str, Any]], title: str = "predictive gating", *,
                  switch: int | None = None) -> Figure | None:
    """Fraction of problems gated (no solution rollouts) over steps, and before the switch-over the
    fraction the controls would have gated (not applied; dashed); None if neither was logged."""
    return _history_figure(history, GATING_KEYS, title, "fraction of problems",
                           switch_step(history) if switch is None else switch)


def plot_meta_rewards(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      title: str = "meta reward", *, switch: int | None = None) -> epath.Path | None:
    """`meta_rewards_figure` as a PNG at ``path``; None (with a WARNING, nothing written) without meta
    rewards, so an end-of-run report does not crash over a GRPO run."""
    return _save_or_warn(meta_rewards_figure(history, title, switch=switch), path, meta_reward_keys())


def plot_gating(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                title: str = "predictive gating", *, switch: int | None = None) -> epath.Path | None:
    """`gating_figure` as a PNG at ``path``; None (with a WARNING) if no gating was logged."""
    return _save_or_warn(gating_figure(history, title, switch=switch), path, GATING_KEYS)


GATING_KEYS = ("gate/fraction", "gate/would_gate_fraction")
# Labels for keys whose name does not say what the line is.
_LABELS = {"gate/would_gate_fraction": "gate/would_gate_fraction (not applied)"}


def _save_or_warn(fig: Figure | None, path: str | os.PathLike, keys: Sequence[str]) -> epath.Path | None:
    if fig is None:
        logger.warning("no %s in the history; %s not written", ", ".join(keys), path)
        return None
    return _save(fig, path)


def _history_figure(history, keys, title, ylabel, switch: int | None) -> Figure | None:
    from matplotlib.ticker import MaxNLocator

    series = {key: history_series(history, key) for key in keys}
    series = {key: xy for key, xy in series.items() if xy[0].size}
    if not series:
        return None
    fig, (ax,) = _new_figure()
    for key, (steps, values) in series.items():
        label = _LABELS.get(key, key) + (" (0 throughout)" if not values.any() else "")
        ax.plot(steps, values, "--" if key in _LABELS else "-", lw=2 if key == keys[0] else 1.2, label=label,
                marker="o" if steps.size == 1 else None)
    if switch is not None:
        ax.axvline(switch, color="0.35", ls=":", lw=1.2, label=f"switch-over (step {switch})")
    # Below 0 and above 1, so a part that stays at 0 (or 1) is a visible line, not the axis.
    ax.set(xlabel="step", ylabel=ylabel, ylim=(-0.04, 1.04), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_curves(series: Mapping[str, tuple], xlabel: str, ylabel: str, path: str | os.PathLike,
                title: str = "", *, logx: bool = False) -> epath.Path:
    """Line per named series, with a shaded ± band where a spread is given.

    ``series[name]`` is ``(x, y)`` or ``(x, y, yerr)`` (yerr: e.g. the std over seeds, or None) —
    for accuracy against step, wall-clock or tokens across methods. Returns the PNG path.
    """
    if not series:
        raise ValueError("plot_curves needs at least one series")
    fig, (ax,) = _new_figure(width=6.0, height=4.0)
    for name, data in series.items():
        if len(data) not in (2, 3):
            raise ValueError(f"series {name!r}: expected (x, y) or (x, y, yerr)")
        x, y = (np.asarray(v, dtype=np.float64) for v in data[:2])
        if x.shape != y.shape:
            raise ValueError(f"series {name!r}: x has {x.size} values, y has {y.size}")
        (line,) = ax.plot(x, y, lw=1.8, label=name)
        yerr = data[2] if len(data) == 3 else None
        if yerr is not None:
            yerr = np.broadcast_to(np.asarray(yerr, dtype=np.float64), y.shape)
            ax.fill_between(x, y - yerr, y + yerr, color=line.get_color(), alpha=0.2, lw=0)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def summary_table(history: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None,
                  window: int = 1) -> str:
    """A short end-of-run table: each key's value at the start and at the end of the run and the change.

    With ``window`` > 1 the start / end values are the means of the first / last ``window`` logged
    values (single RL steps are noisy: one step of 8 problems says little). ``keys`` defaults to the
    ``summary_keys()`` present in the history, or every numeric key if none of those is. Values are the
    non-null ones; with ``window`` == 1 their steps are shown when they differ from the history's
    first / last step.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if keys is None:
        keys = [k for k in summary_keys() if history_series(history, k)[0].size]
        if not keys:
            keys = sorted({k for r in history for k, v in r.items()
                           if k != "step" and _number(v) is not None})
    steps = sorted(s for s in (_number(r.get("step")) for r in history) if s is not None)
    if not steps or not keys:
        return "(no metrics logged)"
    first_step, last_step = steps[0], steps[-1]
    if window == 1:
        header = ("metric", f"first (step {first_step:g})", f"last (step {last_step:g})", "change")
    else:
        head, tail = steps[:window], steps[-window:]
        header = ("metric", f"first {len(head)} steps ({head[0]:g}-{head[-1]:g})",
                  f"last {len(tail)} steps ({tail[0]:g}-{tail[-1]:g})", "change")
    rows = []
    for key in keys:
        key_steps, values = history_series(history, key)
        if not values.size:
            rows.append((key, "-", "-", "-"))
            continue
        start, end = values[:window].mean(), values[-window:].mean()
        first, last = _fmt(start), _fmt(end)
        if window == 1:
            first += "" if key_steps[0] == first_step else f" @{key_steps[0]:g}"
            last += "" if key_steps[-1] == last_step else f" @{key_steps[-1]:g}"
        rows.append((key, first, last, f"{end - start:+.4g}"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def eval_table(evals: Sequence[Mapping[str, Any]]) -> str:
    """The held-out evaluations of a run: accuracy (and per level) at the first and the last one."""
    first, last = evals[0], evals[-1]
    keys = [k for k in first if k.startswith("eval/") and k in last]
    header = ("held-out", f"step {first['step']:g}", f"step {last['step']:g}", "change")
    rows = [(k[len("eval/"):], f"{first[k]:.4f}", f"{last[k]:.4f}", f"{last[k] - first[k]:+.4f}") for k in keys]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in (header, *rows))


def write_figures(workdir: str, history: list[dict], calibration_steps: int, *, meta: bool = True,
                  gating: bool = True) -> None:
    """End-of-run PNGs: predicted vs actual pass rate at the start and the end (the paper's Figure 2),
    the meta reward and its parts over steps (`meta`: the algorithm trains a meta path), and the gated
    fraction over steps (`gating`: MASA-efficient)."""
    fig_dir = fs.join(workdir, "figures")
    fs.makedirs(fig_dir)
    path = fs.join(workdir, "calibration.jsonl")
    if fs.exists(path):
        records = read_jsonl(path)
        if records:
            n = max(1, min(calibration_steps, len(records) // 2 or 1))
            pool = lambda rs: (sum((r["pred"] for r in rs), []), sum((r["true"] for r in rs), []))
            (p0, t0), (p1, t1) = pool(records[:n]), pool(records[-n:])
            plot_calibration(
                [p0, p1], [t0, t1], fs.join(fig_dir, "calibration.png"), "predicted vs actual pass rate",
                panel_titles=[f"steps {records[0]['step']}-{records[n - 1]['step']}",
                              f"steps {records[-n]['step']}-{records[-1]['step']}"])
    if meta:
        plot_meta_rewards(history, fs.join(fig_dir, "meta_rewards.png"))
    if gating:
        plot_gating(history, fs.join(fig_dir, "gating.png"))


def write_calibration(workdir: str, step: int, pred: list, true: list) -> None:
    """Step `step`'s predicted and actual pass rates as a line of calibration.jsonl (the figures' input).
    The file is rewritten, so a resumed run drops the interrupted run's later lines."""
    path = fs.join(workdir, "calibration.jsonl")
    kept = [r for r in read_jsonl(path) if r["step"] < step]
    fs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept + [{"step": step, "pred": pred, "true": true}]))
