"""config.compile_cache: JAX's persistent compilation cache, on by default for runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections as mlc
import pytest

from masa_jax import checkpointing, compile_cache, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_is_the_env_override_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "masa_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == os.path.join(os.path.expanduser("~"), ".cache", "masa_jax", "xla")
    monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == str(tmp_path / "mine")


@pytest.fixture
def restore_jax_cache_flags():
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)


def test_off_turns_the_cache_off_and_a_dir_the_process_chose_is_kept(restore_jax_cache_flags):
    section = mlc.ConfigDict({"enabled": False, "dir": "/elsewhere", "min_compile_time_s": 0.0})
    assert compile_cache.enable(section) is None
    assert jax.config.jax_enable_compilation_cache is False
    chosen = jax.config.jax_compilation_cache_dir  # the test session's (conftest.py)
    assert chosen
    section.enabled = True
    assert compile_cache.enable(section) == chosen and jax.config.jax_enable_compilation_cache is True


def test_the_cache_settings_are_not_part_of_the_run():
    """A resume may move or switch off the cache without --allow_config_change."""
    stored = json.loads(json.dumps(config_lib.base_config().to_dict()))  # as config.json holds it
    c = config_lib.override(config_lib.base_config(), {"compile_cache.enabled": False, "compile_cache.dir": "/x",
                                                       "compile_cache.min_compile_time_s": 2.0})
    assert checkpointing.config_changes(stored, c) == []
    assert checkpointing.config_changes(stored, config_lib.override(c, {"rl.lr": 2e-6})) == ["rl.lr: 1e-06 -> 2e-06"]


def _run(tmp_path, workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_DIR}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [sys.executable, "-m", "masa_jax.train", f"--config={ROOT}/configs/tiny.py", "--config.total_steps=1",
           "--config.eval.files=()", "--config.algorithm=grpo", "--config.data.problems_per_step=2",
           "--config.rl.mini_batch_size=0", "--config.log.figures=False", f"--workdir={workdir}", *extra]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _entries(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.mark.slow
def test_a_run_fills_the_user_cache_and_a_second_run_compiles_nothing_new(tmp_path):
    cache = tmp_path / "xdg" / "masa_jax" / "xla"
    _run(tmp_path, tmp_path / "run1")
    first = _entries(cache)
    assert len(first) > 10, first  # every program of the step, however small
    _run(tmp_path, tmp_path / "run2")
    assert _entries(cache) == first  # all read back: no program compiled again
    _run(tmp_path, tmp_path / "run3", "--config.compile_cache.enabled=False",
         f"--config.compile_cache.dir={tmp_path / 'unused'}")
    assert not (tmp_path / "unused").exists() and _entries(cache) == first
