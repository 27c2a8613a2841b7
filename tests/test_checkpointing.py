"""Tests for masa_jax.checkpointing: round trips onto shardings, fallback, atomicity, SIGTERM."""

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from masa_jax import checkpointing
from masa_jax.checkpointing import CheckpointError, PreemptionGuard, RunCheckpointer


def _mesh_shardings():
    mesh = jax.make_mesh((1,), ("data",))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def _state(value: float):
    """A train-state-like pytree: sharded params, optimizer moments, int step, typed rng key."""
    row, rep = _mesh_shardings()
    w = jax.device_put(jnp.arange(12, dtype=jnp.float32).reshape(4, 3) * value, row)
    return {
        "params": {"w": w, "b": jax.device_put(jnp.full((3,), value, jnp.bfloat16), rep)},
        "opt": {"mu": jax.device_put(w * 0.5, row)},
        "step": jnp.int32(int(value)),
        "rng": jax.random.key(int(value)),
    }


def _assert_state_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _extras(step: int):
    return {
        "data_iterator": {"epoch": 0, "index": np.int64(step * 4)},  # numpy scalars are converted
        "expert_buffer": [{"prompt": [1, 2, 3], "output": [4, 5]}, {"prompt": [6], "output": []}],
        "history": [{"step": s, "reward": 0.5} for s in range(1, step + 1)],
        "step": step,
    }


def test_round_trip_onto_named_shardings(tmp_path):
    row, rep = _mesh_shardings()
    with RunCheckpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        assert ckpt.restore_latest(_state(0.0)) is None
        assert not ckpt.should_save(3)
        assert ckpt.save(3, _state(3.0), _extras(3)) is False  # not on the interval
        for step in (2, 4, 6):
            assert ckpt.save(step, _state(float(step)), _extras(step)) is True
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6]  # max_to_keep=2
        # Abstract template with explicit shardings, as the trainer builds it from eval_shape.
        template = jax.eval_shape(lambda: _state(0.0))
        shardings = jax.tree.map(lambda x: rep, template)
        shardings["params"]["w"] = shardings["opt"]["mu"] = row
        state, extras, step = ckpt.restore_latest(template, shardings)
    assert step == 6
    _assert_state_equal(state, _state(6.0))
    assert state["params"]["w"].sharding == row
    assert state["params"]["b"].sharding == rep
    assert extras == checkpointing.to_json_compatible(_extras(6))
    assert extras["data_iterator"]["index"] == 24


def test_force_save_and_repeated_step(tmp_path):
    with RunCheckpointer(tmp_path, max_to_keep=3, save_interval_steps=100) as ckpt:
        assert ckpt.save(7, _state(7.0), {"a": 1}) is False
        assert ckpt.save(7, _state(7.0), {"a": 1}, force=True) is True
        ckpt.wait()
        # The end-of-run forced save may hit a step that was just saved: not an error.
        assert ckpt.save(7, _state(7.0), {"a": 2}, force=True) is False
        assert ckpt.latest_step() == 7
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            ckpt.save(8, _state(8.0), {"bad": object()}, force=True)


def test_async_save_survives_deleted_device_buffers(tmp_path):
    """save() copies arrays off the device before returning, so donated buffers are safe."""
    state = _state(5.0)
    ckpt = RunCheckpointer(tmp_path, async_save=True)
    ckpt.save(5, state, {})
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.close()
    restored, _, step = RunCheckpointer(tmp_path).restore_latest(_state(0.0))
    assert step == 5
    _assert_state_equal(restored, _state(5.0))


def _truncate_files(paths):
    assert paths, "damage helper found no files to damage"
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "truncated-array-data": lambda step_dir: _truncate_files(
        list((step_dir / "state" / "d").iterdir())),
    "deleted-extras": lambda step_dir: os.remove(step_dir / "extras" / "metadata"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_falls_back_when_newest_is_damaged(tmp_path, caplog, damage):
    with RunCheckpointer(tmp_path, max_to_keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(float(step)), _extras(step))
    DAMAGE[damage](tmp_path / "2")

    with caplog.at_level(logging.WARNING, logger="masa_jax.checkpointing"):
        with RunCheckpointer(tmp_path, max_to_keep=3) as ckpt:
            state, extras, step = ckpt.restore_latest(_state(0.0))
            assert step == 1
            _assert_state_equal(state, _state(1.0))
            assert extras["step"] == 1
            # The damaged step is moved aside, so the resumed run can write step 2 again.
            assert ckpt.all_steps() == [1]
            assert ckpt.save(2, _state(2.0), _extras(2), force=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "2") in w and "falling back" in w for w in warnings), warnings
    assert len(list((tmp_path / "corrupt").iterdir())) == 1
    state, _, step = RunCheckpointer(tmp_path).restore_latest(_state(0.0))
    assert step == 2
    _assert_state_equal(state, _state(2.0))


def test_every_step_unreadable_raises_instead_of_starting_over(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1.0), {})
    wrong_template = {"params": {"w": jnp.zeros((2, 2))}}
    with pytest.raises(CheckpointError, match="could be restored"):
        RunCheckpointer(tmp_path).restore_latest(wrong_template)
    assert (tmp_path / "1").is_dir()  # nothing quarantined when no step restored


def test_interrupted_save_is_invisible_and_cleaned_up(tmp_path):
    """What a crash mid-save leaves on POSIX: a tmp-named directory with partial content."""
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1.0), {"step": 1})
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000000"
    shutil.copytree(tmp_path / "1", partial)
    os.remove(partial / "commit_success.txt")
    _truncate_files(list((partial / "state" / "d").iterdir()))

    ckpt = RunCheckpointer(tmp_path)
    assert ckpt.latest_step() == 1
    _, extras, step = ckpt.restore_latest(_state(0.0))
    assert (step, extras) == (1, {"step": 1})
    ckpt.close()
    assert not partial.exists()  # cleanup_tmp_directories removed it


def test_preemption_guard_sets_flag_and_restores_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not guard.should_stop and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs in the main thread between bytecodes
            assert guard.should_stop and guard.should_stop_all()
            assert calls == []  # ours replaced the previous handler while active
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [signal.SIGTERM]  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


_LOOP_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from masa_jax.checkpointing import PreemptionGuard, RunCheckpointer

    mesh = jax.make_mesh((2,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    state = {"w": jax.device_put(jnp.zeros((4, 2)), sharding), "step": jnp.int32(0)}
    update = jax.jit(lambda s: {"w": s["w"] + 1.0, "step": s["step"] + 1})
    ckpt = RunCheckpointer(sys.argv[1], save_interval_steps=1000)
    with PreemptionGuard() as guard:
        for step in range(1, 10_000):
            state = update(state)
            ckpt.save(step, state, {"step": step, "buffer": [[step]]})
            print("step", step, flush=True)
            if guard.should_stop_all():
                ckpt.save(step, state, {"step": step, "buffer": [[step]]}, force=True)
                ckpt.close()
                print("saved", step, flush=True)
                sys.exit(0)
            time.sleep(0.05)
    sys.exit(3)
""")


def _read_line(proc, deadline):
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"loop script gave no output; stderr: {proc.stderr.read()[-2000:]}")


def test_sigterm_subprocess_leaves_restorable_checkpoint(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(_LOOP_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _read_line(proc, deadline).strip() != "step 3":
        pass
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    saved = int(out.strip().splitlines()[-1].split()[1])
    assert saved >= 3

    # Saved over a 2-device mesh in the child; restored onto this process's 1-device mesh.
    row, rep = _mesh_shardings()
    template = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, extras, step = RunCheckpointer(tmp_path / "ckpt").restore_latest(
        template, {"w": row, "step": rep})
    assert step == saved == extras["step"] and extras["buffer"] == [[saved]]
    assert int(state["step"]) == saved
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 2), float(saved)))
    assert state["w"].sharding == row
