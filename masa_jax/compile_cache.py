"""JAX's persistent compilation cache for runs (`config.compile_cache`): a second run of a config, a
resumed run or an evaluation of its checkpoints reads the step's executables back from disk instead of
compiling them again (docs/benchmarks.md: the tiny run's first step cold and warm).

Set before the process's first compilation (`train.train` and `evaluate` do it right after the config
checks): JAX opens its cache once, at the first compile, and keeps it. A cache directory the process
chose itself (`jax.config.update("jax_compilation_cache_dir", ...)` before calling us, as the test
session does) is kept.
"""
from __future__ import annotations

import os

import jax

from masa_jax import fs

ENV_DIR = "MASA_JAX_COMPILE_CACHE_DIR"  # the default directory (before $XDG_CACHE_HOME/masa_jax/xla)


def default_dir() -> str:
    """$MASA_JAX_COMPILE_CACHE_DIR, else the user cache: $XDG_CACHE_HOME (or ~/.cache)/masa_jax/xla."""
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "masa_jax", "xla")


def enable(section) -> str | None:
    """Applies `config.compile_cache` (enabled, dir, min_compile_time_s); returns the directory in use,
    None when the cache is off."""
    if not section.enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_compilation_cache_dir:  # the process chose one already: keep it
        return jax.config.jax_compilation_cache_dir
    path = fs.absolute(section.dir or default_dir())
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, however quick to compile: a step's many small ones add up to most of the start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(section.min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
