"""What the multi-controller trainer needs beyond the mesh: host-local sampling and host agreement.

Each JAX process rolls out its own problems on its own devices (no cross-host traffic in the decode
loop): `local_sampling_mesh` / `to_local` turn the sampling-layout params (replicated over data and
fsdp, tensor-parallel within a host) into arrays on a process-local mesh without copying. Small host
values (metrics, data-iterator states, counts) are exchanged with `allgather_json`.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from masa_jax.parallel.mesh import MESH_AXES

# Metrics that add up over hosts; every other metric is averaged over the hosts that report it.
SUMMED_PREFIXES = ("tokens/", "flops/", "problems", "bc/experts", "bc/new_experts", "bc/buffer_size",
                   "cutoff/tokens_saved", "cutoff/would_save_tokens", "dapo/kept_groups", "dapo/kept_meta_groups", "actor/batch_rows",
                   "actor/forward_tokens")


def allgather_json(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] for a JSON-serialisable obj (every process calls it)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def combine_metrics(per_host: list[dict[str, float]]) -> dict[str, float]:
    """Sums of counts, means of rates over the hosts that report a key."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in per_host for k in m):
        vals = [m[key] for m in per_host if key in m and m[key] is not None]
        if not vals:
            continue
        out[key] = float(np.sum(vals)) if key.startswith(SUMMED_PREFIXES) else float(np.mean(vals))
    return out


def global_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """This process's step metrics combined with every other process's (identical on all of them)."""
    if jax.process_count() == 1:
        return metrics
    return combine_metrics(allgather_json(metrics))


def local_sampling_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """A mesh over this process's devices only, keeping each device's tensor coordinate.

    Requires the tensor axis to lie within a host (the innermost mesh axis, as `make_mesh` lays it out).
    """
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    tensor = mesh.shape["tensor"]
    if len(devices) % tensor:
        raise ValueError(f"tensor axis {tensor} does not fit the {len(devices)} devices of one host")
    grid = np.array(devices, dtype=object).reshape(1, len(devices) // tensor, tensor)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def to_local(tree: Any, local_mesh: jax.sharding.Mesh) -> Any:
    """Global arrays replicated over (data, fsdp) -> the same values as arrays on `local_mesh`, built
    from this process's own shards (no copy, no communication)."""
    def convert(x: jax.Array) -> jax.Array:
        spec = x.sharding.spec
        shards = {s.device: s.data for s in x.addressable_shards}
        ordered = [shards[d] for d in local_mesh.devices.flat]
        return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(local_mesh, spec), ordered)
    return jax.tree.map(convert, tree)
