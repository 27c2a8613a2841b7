"""Run by test_attention_kernels.py in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set before
jax starts): the Pallas kernels (interpret mode) under a (data=1, fsdp=2, tensor=2) mesh, where they run
per shard through shard_map, against the single-device XLA path. Prints one JSON line "RESULT {...}".

Two kv-head settings: 2 kv heads over tensor 2 (query and kv heads split alike) and 1 kv head (kv heads
replicated: every tensor shard computes all query heads)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from masa_jax import sampling
from masa_jax.models import qwen
from masa_jax.models.qwen import attention as attn_lib
from masa_jax.sampling import kv_cache
from masa_jax.parallel.mesh import make_mesh
from masa_jax.parallel.rules import TRAIN_RULES, tree_shardings


def main():
    result = {"device_count": jax.device_count()}
    mesh = make_mesh((1, 2, 2))
    for kv_heads in (2, 1):
        cfg = qwen.ModelConfig(family="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                               num_heads=4, num_kv_heads=kv_heads, head_dim=16)
        pc = cfg.replace(attention_impl="pallas", pallas_interpret=True)
        params = qwen.init_params(cfg, jax.random.key(0), std=0.3)
        rs = np.random.RandomState(0)
        tokens = jnp.asarray(rs.randint(0, 128, (4, 12)), jnp.int32)
        mask = jnp.asarray(np.arange(12)[None, :] >= 12 - np.array([12, 5, 9, 1])[:, None])
        ref = jax.jit(qwen.forward, static_argnums=0)(cfg, params, tokens, mask)
        train = jax.device_put(params, tree_shardings(qwen.param_logical_axes(cfg), qwen.param_shapes(cfg), mesh,
                                                      TRAIN_RULES))
        with jax.set_mesh(mesh):
            fwd = jax.jit(qwen.forward, static_argnums=0)
            out = fwd(pc, train, tokens, mask)
            ref_mesh = fwd(cfg, train, tokens, mask)     # XLA, same mesh: same sharded reductions
            hlo = fwd.lower(pc, train, tokens, mask).as_text()
        prompts = [rs.randint(0, 128, n).tolist() for n in (3, 9, 1, 14, 6, 2)]
        kw = dict(rng=jax.random.key(5), temperature=0.0, max_new_tokens=8, budgets=[8, 3, 8, 1, 6, 8],
                  num_slots=4, max_cache_len=64, cache_dtype=jnp.bfloat16)
        # The kernels alone, on sharded inputs (batch over fsdp, heads over tensor where they divide).
        q = jnp.asarray(rs.randn(4, 12, 4, 16), jnp.float32)
        k, v = (jnp.asarray(rs.randn(4, 12, kv_heads, 16), jnp.float32) for _ in range(2))
        seq = lambda c: jax.jit(lambda q, k, v, m: attn_lib.sequence_attention(c, m)(q, k, v)[0])
        ref_attn = seq(cfg)(q, k, v, mask)
        qd = jnp.asarray(rs.randn(4, 4, 16), jnp.float32)
        kc, vc = (jnp.asarray(rs.randn(kv_heads, 4, 64, 16), jnp.bfloat16).astype(jnp.float32) for _ in range(2))
        lengths = jnp.array([1, 64, 30, 7], jnp.int32)
        ref_dec = kv_cache.decode_attention(qd, jnp.transpose(kc, (1, 0, 3, 2)), jnp.swapaxes(vc, 0, 1), lengths)
        with jax.set_mesh(mesh):
            splash = seq(pc)(q, k, v, mask)
            paged = jax.jit(lambda *a: attn_lib.paged_decode_attention(pc, *a))(qd, kc, vc, lengths)
        # Reference: the XLA path on the same mesh (same tensor-parallel reductions, so the same bfloat16
        # cache contents), and on one device.
        sp = sampling.to_sampling_params(cfg, train, mesh=mesh)
        ref_gen = sampling.generate(cfg, sp, prompts, mesh=mesh, **kw)
        one_gen = sampling.generate(cfg, params, prompts, **kw)
        gen = sampling.generate(pc, sp, prompts, mesh=mesh, **kw)
        lp_diff = lambda a, b: float(max(np.abs(x - y).max() for x, y in zip(a.logprobs, b.logprobs)))
        result[f"kv{kv_heads}"] = dict(
            splash_max_diff=float(jnp.abs(splash - ref_attn)[np.asarray(mask)].max()),
            paged_max_diff=float(jnp.abs(paged - ref_dec).max()),
            forward_max_diff=float(jnp.abs(out - ref_mesh)[np.asarray(mask)].max()),
            forward_vs_one_device_max_diff=float(jnp.abs(out - ref)[np.asarray(mask)].max()),
            shard_map_in_hlo="shard_map" in hlo or "sdy.manual_computation" in hlo,
            greedy_equal=gen.tokens == ref_gen.tokens == one_gen.tokens,
            max_logprob_diff=lp_diff(gen, ref_gen), xla_mesh_vs_one_device_logprob_diff=lp_diff(ref_gen, one_gen))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
