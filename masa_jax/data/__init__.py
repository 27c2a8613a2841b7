"""Data layer: problem sources (verl parquet, JSONL, TFDS) and the grain batch pipeline.

`from masa_jax.data import Problem, load_problems` is cheap (no jax, no pyarrow until a parquet
file is read). The pipeline imports grain (and with it jax), so it is loaded on first use:
`from masa_jax.data import pipeline` or `masa_jax.data.batches(...)`.
"""

from typing import Any

from masa_jax.data.sources import (
    DataError,
    Loaded,
    Problem,
    filter_overlong,
    load_all,
    load_jsonl,
    load_problems,
    load_tfds,
    load_verl_parquet,
)

_PIPELINE_NAMES = ("batches", "BatchIterator", "PipelineConfig", "per_host_batch_size", "steps_per_epoch",
                   "host_block", "load_host_problems", "load_host_all")

__all__ = [
    "DataError",
    "Loaded",
    "Problem",
    "filter_overlong",
    "load_all",
    "load_jsonl",
    "load_problems",
    "load_tfds",
    "load_verl_parquet",
    *_PIPELINE_NAMES,
]


def __getattr__(name: str) -> Any:
    # Lazy so that importing the sources never pulls in grain / jax.
    if name in _PIPELINE_NAMES:
        from masa_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'masa_jax.data' has no attribute {name!r}")
