"""One process of the two-process CPU test: `python mp_worker.py <process_id> <port> <model_dir> <workdir>`.

Runs 2 steps of a small MASA config on a (1, 8, 1) mesh spanning both processes (4 CPU devices each,
gloo collectives) — the code path of a TPU pod — then writes a digest of its final params.
"""
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from masa_jax import components, train  # noqa: E402
from small_config import make_small_config  # noqa: E402


def main(process_id: int, port: int, model_dir: str, workdir: str) -> None:
    c = make_small_config(model_dir, "masa", **{
        "total_steps": 2, "mesh.coordinator_address": f"localhost:{port}", "mesh.num_processes": 2,
        "mesh.process_id": process_id, "data.problems_per_step": 4,  # 2 problems per host
        "rollout.max_response_length": 16, "rollout.meta_max_new_tokens": 16, "rl.micro_batch_size": 8,
        "checkpoint.every": 2, "log.tensorboard": False})
    train.train(c, workdir)
    assert jax.process_count() == 2 and jax.device_count() == 8
    # Params after training, gathered to every host: both processes must hold the same model.
    from masa_jax.checkpointing import RunCheckpointer
    from masa_jax.rl import update as update_lib
    from masa_jax.config import resolve
    from masa_jax.models import qwen
    from masa_jax.parallel.mesh import make_mesh
    config = resolve(c)
    mesh = make_mesh(config.mesh.shape)
    model_cfg, params = qwen.from_pretrained(model_dir, mesh=mesh)
    from masa_jax.rl import train_step
    template = train_step.checkpoint_view(update_lib.Updater.create(components.updater_config(config), model_cfg, params, mesh,
                                                                          pad_id=0).state)
    state, _, step = RunCheckpointer(f"{workdir}/checkpoints").restore_latest(template)
    leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(state.params)]
    initial = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(params)]
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, initial)), "training changed nothing"
    digest = np.array([float(np.sum(np.abs(x), dtype=np.float64)) for x in leaves])
    np.save(f"{workdir}/params_digest_{process_id}.npy", digest)
    print("step", step, "digest", digest.sum())


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
