"""Run by test_qwen_sharded.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax
is imported, so it cannot run inside the pytest process). Loads a checkpoint on one device and on each
mesh given, and prints one JSON object: per mesh, the placement of every param and the largest logit /
log-prob difference from the one-device run.

usage: python sharded_forward_check.py CHECKPOINT_DIR 2,2,2 1,4,2
"""
from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from masa_jax.models import qwen
from masa_jax.parallel.mesh import make_mesh
from masa_jax.parallel.rules import logical_to_spec


def placements(params, reference) -> dict:
    """path -> global shape, spec, distinct shard shapes, and whether every shard holds exactly the
    one-device value at its index."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        ref = np.asarray(functools.reduce(lambda t, k: t[k.key], path, reference))
        out["/".join(k.key for k in path)] = {
            "shape": list(x.shape),
            "spec": [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
            "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            "values_ok": all(np.array_equal(np.asarray(s.data), ref[s.index]) for s in x.addressable_shards),
            "num_devices": len(x.sharding.device_set),
        }
    return out


def main(ckpt: str, meshes: list[tuple[int, ...]]) -> dict:
    rng = np.random.RandomState(0)
    lengths = (12, 5, 9, 1)
    tokens = rng.randint(0, 128, (4, 12)).astype(np.int32)
    mask = np.arange(12)[None, :] >= 12 - np.array(lengths)[:, None]  # left padding

    def run(cfg, params, tok, msk):
        # A fresh jit per mesh context: the constraints inside the model read the mesh at trace time.
        logits = jax.jit(qwen.forward, static_argnums=0)(cfg, params, tok, msk)
        logp = jax.jit(functools.partial(qwen.token_logprobs, chunk_size=5), static_argnums=0)(cfg, params, tok, msk)
        return logits, logp

    cfg, single = qwen.from_pretrained(ckpt)
    ref_logits, ref_logp = (np.asarray(x) for x in run(cfg, single, jnp.asarray(tokens), jnp.asarray(mask)))
    result = {"device_count": jax.device_count(),
              "single_device": [len(x.sharding.device_set) for x in jax.tree.leaves(single)]}
    for shape in meshes:
        mesh = make_mesh(shape)
        cfg_m, params = qwen.from_pretrained(ckpt, mesh=mesh)
        batch = NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh=mesh, shape=tokens.shape))
        with jax.set_mesh(mesh):
            logits, logp = run(cfg_m, params, jax.device_put(tokens, batch), jax.device_put(mask, batch))
        result[",".join(map(str, shape))] = {
            "params": placements(params, single),
            "logits_diff": float(np.abs(np.asarray(logits) - ref_logits)[mask].max()),
            "logp_diff": float(np.abs(np.asarray(logp) - ref_logp)[:, 1:][mask[:, 1:]].max()),
            "logits_spec": str(logits.sharding.spec),
        }
        if shape == meshes[0]:  # export gathers sharded params layer by layer: same bytes as from one device
            with tempfile.TemporaryDirectory() as tmp:
                qwen.save_pretrained(cfg_m, params, Path(tmp) / "mesh", max_shard_size="50KB")
                qwen.save_pretrained(cfg, single, Path(tmp) / "one", max_shard_size="50KB")
                files = sorted(p.name for p in (Path(tmp) / "one").iterdir())
                result["save_files"] = len(files)
                result["save_identical"] = files == sorted(p.name for p in (Path(tmp) / "mesh").iterdir()) and all(
                    (Path(tmp) / "one" / f).read_bytes() == (Path(tmp) / "mesh" / f).read_bytes() for f in files)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], [tuple(int(a) for a in m.split(",")) for m in sys.argv[2:]])))
