"""Device mesh from config, and multi-host start-up (one JAX process per host)."""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np

from masa_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 in `shape` by whatever makes the product equal `num_devices`."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if any(s < 1 and s != -1 for s in shape):
        raise UserError(f"config.mesh.shape {tuple(shape)}: sizes must be >= 1 (or one -1)")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise UserError(f"config.mesh.shape {tuple(shape)}: {known} does not divide the {num_devices} "
                            f"device(s) of this run; set the fixed sizes to divide {num_devices}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise UserError(f"config.mesh.shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                        f"this run has {num_devices}: make the sizes multiply to {num_devices} (or use one -1)")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types (XLA propagates shardings from the
    constraints we place), over all global devices by default."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    except NotImplementedError as e:  # mesh_utils: the logical shape does not tile the chips' torus
        raise UserError(f"config.mesh.shape={tuple(shape)} does not fit the physical mesh of the {len(devices)} "
                        f"devices: each axis must be a product of physical axis sizes "
                        f"(jax: {str(e).split('. ')[0]})") from e


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                           auto: bool = False) -> None:
    """Starts the JAX multi-controller runtime when asked for.

    On TPU pods (`auto=True`) JAX discovers the coordinator itself; elsewhere pass the coordinator
    address, process count and this process's id. Does nothing when neither is given.
    """
    if coordinator_address is None and not auto:
        return
    kwargs = {}
    if coordinator_address is not None:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
