"""Logical axis names -> mesh axes: one rules table per layout (training, sampling).

Every parameter and key activation is annotated with logical axis names (see `models/qwen/model.py`);
these tables are the only place that decides how they map onto the ("data", "fsdp", "tensor") mesh.
Parameters and activations use different names for the model dimension (`embed` vs `act_embed`) because
FSDP shards parameters along `embed` while activations are already sharded along the batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

# Training layout: FSDP over (data x fsdp) for the batch, params sharded over fsdp (embed) and tensor.
TRAIN_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)

# Sampling layout: tensor-parallel weights replicated over data and fsdp, so a decode step needs no
# all-gather of parameters (only the tensor-parallel reductions).
SAMPLING_RULES: Rules = tuple((name, None) if name == "embed" else (name, axes) for name, axes in TRAIN_RULES)


def _lookup(rules: Rules, name: str | None):
    if name is None:
        return None
    for key, axes in rules:
        if key == name:
            return axes
    raise KeyError(f"logical axis {name!r} has no rule; known: {[k for k, _ in rules]}")


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules = TRAIN_RULES,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array with the given logical axes.

    With `mesh` and `shape`, a dimension that the mapped mesh axes do not divide is replicated instead
    (e.g. 2 kv-heads on a tensor axis of 4), and mesh axes of size 1 are dropped; each mesh axis is
    used at most once.
    """
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical_axes):
        axes = _lookup(rules, name)
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
            axes = tuple(a for a in axes if a in sizes and sizes[a] > 1)
            if shape is not None:
                total = int(np.prod([sizes[a] for a in axes])) if axes else 1
                if shape[dim] % total:
                    axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(logical_tree, shapes_tree, mesh: jax.sharding.Mesh, rules: Rules = TRAIN_RULES):
    """NamedShardings for a pytree, given a matching pytree of logical-axis tuples and of shapes."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    return jax.tree.map(
        lambda axes, s: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, s.shape)),
        logical_tree, shapes_tree, is_leaf=is_axes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = TRAIN_RULES) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh (`jax.set_mesh`); a no-op
    when no mesh is set, so the same model code runs on one device without any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, mesh, x.shape))
