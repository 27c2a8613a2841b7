"""Grain pipeline: shuffled, repeated, per-host sharded batches of `Problem`s with resumable state.

Order of operations (all index arithmetic, nothing is copied):

    global stream = shuffle(problems, seed) repeated num_epochs times (each epoch reshuffled)
    host h reads global positions h, h + P, h + 2P, ...          (P = process_count)
    batches of `batch_size` consecutive host positions            (lists of Problem, no tensors)

So host batch b of every host together is the contiguous global window
[b * batch_size * P, (b + 1) * batch_size * P): hosts are disjoint, together they cover every
position, and all hosts see the same number of batches (with a finite num_epochs and
drop_remainder=True the global stream is cut to a multiple of batch_size * P).

An unbounded random-access source (len == sys.maxsize, e.g. `masa_jax.toy.world.source`) is read in
index order: it is already random, and there is no epoch to shuffle or repeat.

`BatchIterator.get_state()` returns a small JSON-serialisable dict; `set_state()` on an iterator
built with the same arguments resumes with exactly the batches the saved one would have produced.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator, Sequence

import grain

from masa_jax.data.sources import Problem

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
    """

    batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    process_index: int
    process_count: int
    drop_remainder: bool
    num_problems: int


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


def _build(source: Sequence[Problem], cfg: PipelineConfig) -> grain.IterDataset:
    ds = grain.MapDataset.source(source)
    if not _is_unbounded(source):
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        # repeat() reseeds the shuffle each epoch, deterministically from `seed`.
        ds = ds.repeat(cfg.num_epochs)
        if cfg.num_epochs is not None and cfg.drop_remainder:
            # Cut the global stream so every host yields the same number of full batches.
            window = cfg.batch_size * cfg.process_count
            ds = ds[: (len(ds) // window) * window]
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
        return seen / self.config.num_problems

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
        saved = state["config"]
        mine = dataclasses.asdict(self.config)
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
) -> BatchIterator:
    """Batches of `batch_size` Problems for this host (see the module docstring for the order).

    source: a random-access sequence of Problems (a list, `Loaded.problems`, or an unbounded
      source with len == sys.maxsize such as `masa_jax.toy.world.source(...)`).
    process_index / process_count default to jax.process_index() / jax.process_count().
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
    cfg = PipelineConfig(
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        num_problems=len(source),
    )
    return BatchIterator(source, cfg)


def steps_per_epoch(num_problems: int, global_batch_size: int) -> int:
    """Full global batches in one pass over `num_problems` problems (floor)."""
    return num_problems // global_batch_size
