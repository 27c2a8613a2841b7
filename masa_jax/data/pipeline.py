"""Grain pipeline: shuffled, repeated, per-host sharded batches of `Problem`s with resumable state,
and per-host loading that parses only the host's rows of each data file.

Two ways to split the data between the P hosts (all index arithmetic, nothing is copied):

1. A host-loaded shard (what the trainer does): `load_host_problems(spec, process_index=h,
   process_count=P)` reads and parses only host h's contiguous block of rows of a file (`host_block`:
   rows [h * N // P, (h + 1) * N // P); a verl parquet file is read by row group, so a host fetches
   about N / P rows from gs://), and `batches(shard, ..., sharded=True)` shuffles that shard:

       host h's stream = shuffle(shard_h, seed_h) repeated num_epochs times (each epoch reshuffled)
       global stream position q * P + h = host h's position q

   The shards are disjoint and together are exactly the file (concatenated in host order they equal
   `sources.load_problems(spec)`), so each epoch every host reads its N / P problems once. seed_h is
   `seed` itself on a single host (the order equals mode 2's) and a per-host seed derived from
   (seed, h, P) otherwise; the order is deterministic for a given (data, seed, P).

2. The whole source on every host (`batches(problems, ...)`, the default):

       global stream = shuffle(problems, seed) repeated num_epochs times (each epoch reshuffled)
       host h reads global positions h, h + P, h + 2P, ...

In both, host batch b holds `batch_size` consecutive host positions (lists of Problem, no tensors), so
host batch b of every host together is the contiguous global window [b * batch_size * P,
(b + 1) * batch_size * P): hosts are disjoint, together they cover every position, and all hosts see
the same number of batches (with a finite num_epochs and drop_remainder=True the stream is cut to a
multiple of batch_size * P; for shards of different sizes pass `shard_sizes`).

An unbounded random-access source (len == sys.maxsize, e.g. `masa_jax.toy.world.source`) is read in
index order: it is already random, and there is no epoch to shuffle or repeat.

`BatchIterator.get_state()` returns a small JSON-serialisable dict; `set_state()` on an iterator
built with the same arguments resumes with exactly the batches the saved one would have produced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import grain
import numpy as np

from masa_jax import fs
from masa_jax.data import sources
from masa_jax.data.problem import Problem

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines the batch sequence (saved in the state to catch mismatches).

    batch_size: problems per batch on THIS host (global batch = batch_size * process_count).
    seed: shuffle seed (the same on every host).
    shuffle: shuffle each epoch (ignored for unbounded sources).
    num_epochs: passes over the data; None repeats forever.
    process_index / process_count: this host's slice of the global stream.
    drop_remainder: drop a last partial batch (only reachable with a finite num_epochs).
    num_problems: len(source); sys.maxsize for an unbounded source.
    sharded: the source is this host's shard (`load_host_problems`), not the whole data set.
    shard_sizes: with `sharded`, every host's shard size (None: all as large as this one).
    """

    batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    process_index: int
    process_count: int
    drop_remainder: bool
    num_problems: int
    sharded: bool = False
    shard_sizes: tuple[int, ...] | None = None


# Fields added after version 1 states were first written: a state without them has these values.
_FIELD_DEFAULTS = {"sharded": False, "shard_sizes": None}


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size / process_count; raises ValueError unless it divides evenly."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by process_count {process_count}"
        )
    return global_batch_size // process_count


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazy: only when the caller did not say which host this is

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _is_unbounded(source: Sequence[Any]) -> bool:
    return len(source) >= sys.maxsize


def shard_seed(seed: int, process_index: int, process_count: int) -> int:
    """The shuffle seed of host `process_index`'s shard: `seed` on a single host, else one derived
    from (seed, process_index, process_count), so that the hosts' shards are not permuted alike."""
    if process_count == 1:
        return seed
    return int(np.random.SeedSequence([seed, process_index, process_count]).generate_state(1)[0])


def _build(source: Sequence[Problem], cfg: PipelineConfig) -> grain.IterDataset:
    ds = grain.MapDataset.source(source)
    if cfg.sharded and not _is_unbounded(source):
        if cfg.shuffle:
            ds = ds.shuffle(seed=shard_seed(cfg.seed, cfg.process_index, cfg.process_count))
        ds = ds.repeat(cfg.num_epochs)
        if cfg.num_epochs is not None and cfg.drop_remainder:
            # Every host stops after the batches of the smallest shard (collectives would hang otherwise).
            smallest = min(cfg.shard_sizes) if cfg.shard_sizes else len(source)
            ds = ds[: (smallest * cfg.num_epochs // cfg.batch_size) * cfg.batch_size]
    elif not _is_unbounded(source):
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        # repeat() reseeds the shuffle each epoch, deterministically from `seed`.
        ds = ds.repeat(cfg.num_epochs)
        if cfg.num_epochs is not None and cfg.drop_remainder:
            # Cut the global stream so every host yields the same number of full batches.
            window = cfg.batch_size * cfg.process_count
            ds = ds[: (len(ds) // window) * window]
    if not cfg.sharded:
        ds = ds[cfg.process_index :: cfg.process_count]
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=list)
    # Elements are cheap host-side objects: reading them in threads would only cost CPU.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


class BatchIterator(Iterator[list[Problem]]):
    """Iterator over `list[Problem]` batches with JSON-serialisable `get_state` / `set_state`."""

    def __init__(self, source: Sequence[Problem], cfg: PipelineConfig):
        self.config = cfg
        self._source = source
        self._it = iter(_build(source, cfg))
        self._batches = 0

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list[Problem]:
        batch = next(self._it)
        self._batches += 1
        return batch

    @property
    def batches_consumed(self) -> int:
        """Batches this host has taken so far (restored by set_state)."""
        return self._batches

    @property
    def epoch(self) -> float:
        """Fractional epoch of the global stream reached after the batches consumed so far."""
        if _is_unbounded(self._source) or self.config.num_problems == 0:
            return 0.0
        seen = self._batches * self.config.batch_size * self.config.process_count
        total = self.config.num_problems
        if self.config.sharded:
            total = sum(self.config.shard_sizes) if self.config.shard_sizes else total * self.config.process_count
        return seen / total

    def get_state(self) -> dict[str, Any]:
        """{"version", "grain": grain's iterator state, "batches", "config": PipelineConfig fields}."""
        return {
            "version": _STATE_VERSION,
            "grain": self._it.get_state(),
            "batches": self._batches,
            "config": dataclasses.asdict(self.config),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from `get_state` of an iterator built with the same arguments.

        Raises ValueError when the saved configuration differs (other seed, batch size, host, data
        size...), since the restored position would then point into a different stream.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported pipeline state version {state.get('version')!r}")
        saved = {**_FIELD_DEFAULTS, **state["config"]}
        mine = json.loads(json.dumps(dataclasses.asdict(self.config)))  # tuples as the saved JSON lists
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"pipeline state was saved with a different configuration (saved, now): {diff}")
        self._it.set_state(state["grain"])
        self._batches = int(state["batches"])


def batches(
    source: Sequence[Problem],
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    sharded: bool = False,
    shard_sizes: Sequence[int] | None = None,
) -> BatchIterator:
    """Batches of `batch_size` Problems for this host (see the module docstring for the order).

    source: a random-access sequence of Problems (a list, `Loaded.problems`, or an unbounded
      source with len == sys.maxsize such as `masa_jax.toy.world.source(...)`).
    process_index / process_count default to jax.process_index() / jax.process_count().
    sharded: `source` is already this host's shard (`load_host_problems`): it is shuffled on its own
      and not sliced further. shard_sizes: then every host's shard size (e.g. gathered from all
      hosts), for `epoch` and for a finite num_epochs (all hosts stop with the smallest shard).
    Returns a `BatchIterator` yielding list[Problem] of length batch_size (the last one shorter only
    with drop_remainder=False and a finite num_epochs).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if len(source) == 0:
        raise ValueError("cannot batch an empty source")
    process_index, process_count = _process_defaults(process_index, process_count)
    if sharded and _is_unbounded(source):
        raise ValueError("an unbounded source cannot be a host's shard: pass it with sharded=False")
    if shard_sizes is not None:
        if not sharded:
            raise ValueError("shard_sizes is only meaningful with sharded=True")
        shard_sizes = tuple(int(n) for n in shard_sizes)
        if len(shard_sizes) != process_count or shard_sizes[process_index] != len(source):
            raise ValueError(f"shard_sizes {shard_sizes} must hold {process_count} sizes, this host's "
                             f"(index {process_index}) equal to len(source) = {len(source)}")
    if process_count == 1:  # one host's shard is everything: the same stream (and saved state) as unsharded
        sharded, shard_sizes = False, None
    cfg = PipelineConfig(
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        num_problems=len(source),
        sharded=sharded,
        shard_sizes=shard_sizes,
    )
    return BatchIterator(source, cfg)


def steps_per_epoch(num_problems: int, global_batch_size: int) -> int:
    """Full global batches in one pass over `num_problems` problems (floor)."""
    return num_problems // global_batch_size


# --------------------------------------------------------------------------- per-host loading


host_block = sources.host_block  # re-exported: the per-host loaders below and their tests use it


def load_host_problems(
    spec: str | os.PathLike[str],
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    on_error: sources.OnError = "raise",
    split: str = "train",
    **tfds_kwargs: Any,
) -> sources.Loaded:
    """Host `process_index`'s share of `spec` (the specs of `sources.load_problems`), parsing only its rows.

    The share is `host_block` over the file's records: parquet rows (only the row groups overlapping
    the block are read), the non-blank lines of a JSONL file, TFDS elements (random access), or the
    problems a toy spec generates (sliced; they are generated, not read). Problems, uids, rows and
    skip messages are those of `sources.load_problems(spec)` for these rows: concatenated over
    process_index = 0..P-1 the shares are exactly `sources.load_problems(spec, ...)`. A missing file or
    a file without the required columns fails on every host alike; a malformed row only on the host
    that owns it (on_error="raise").
    process_index / process_count default to jax.process_index() / jax.process_count().
    """
    h, p = _process_defaults(process_index, process_count)
    spec = os.fspath(spec)
    if sources.generator_for(spec) is not None:
        problems = sources.load_problems(spec).problems
        block = host_block(len(problems), h, p)
        return sources.Loaded(problems[block.start:block.stop])
    if spec.startswith("tfds:"):
        m = sources._TFDS_SPEC.match(spec)
        if not m:
            raise ValueError(f"bad TFDS spec {spec!r}: expected tfds:<name>[:<split>]")
        return sources.load_tfds(m.group("name"), split=m.group("split") or split, on_error=on_error, shard=(h, p),
                                 **tfds_kwargs)
    if spec.endswith(".parquet"):
        return _load_parquet_block(spec, h, p, on_error)
    if spec.endswith(".jsonl"):
        return sources.load_jsonl(spec, on_error=on_error, shard=(h, p))
    raise ValueError(f"don't know how to read {spec!r}: expected {sources.expected_kinds()}")


def load_host_all(
    specs: Iterable[str | os.PathLike[str]],
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    on_error: sources.OnError = "raise",
    **kwargs: Any,
) -> sources.Loaded:
    """`load_host_problems` of every spec, concatenated in order (empty specs are ignored)."""
    problems: list[Problem] = []
    skipped: list[str] = []
    for spec in specs:
        if not os.fspath(spec):
            continue
        loaded = load_host_problems(spec, process_index=process_index, process_count=process_count,
                                    on_error=on_error, **kwargs)
        problems.extend(loaded.problems)
        skipped.extend(loaded.skipped)
    return sources.Loaded(tuple(problems), tuple(skipped))


def _load_parquet_block(path: str, h: int, p: int, on_error: sources.OnError) -> sources.Loaded:
    """`sources.load_verl_parquet` restricted to host h's block, reading only the row groups it overlaps."""
    import pyarrow.parquet as pq  # lazy, as in sources

    with fs.open(path, "rb") as f:  # a file object: pyarrow alone would not find a gs:// file
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if "reward_model" not in names:
            raise sources.DataError(path, 0, "reward_model", "missing column")
        columns = [c for c in ("prompt", "reward_model", "level") if c in names]
        block = host_block(pf.metadata.num_rows, h, p)
        groups, first, start = [], 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < block.stop and start + n > block.start:
                if not groups:
                    first = start
                groups.append(g)
            start += n
        records = []
        if groups and len(block):
            table = pf.read_row_groups(groups, columns=columns)
            records = table.slice(block.start - first, len(block)).to_pylist()
    stem = sources._stem(path)

    def rows() -> Iterable[tuple[int, Callable[[], Problem]]]:
        for i, rec in zip(block, records):
            yield i, (lambda rec=rec, i=i: sources.verl_row_to_problem(rec, source=path, row=i, uid=f"{stem}:{i}"))

    return sources._collect(rows(), path, on_error)
