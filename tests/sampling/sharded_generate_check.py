"""Run by test_sharded_generate.py in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set
before jax starts): reshards FSDP x tensor training params into the sampling layout on a
(data=1, fsdp=2, tensor=2) mesh, generates on the mesh, and compares greedy outputs with one device
(8 slots: one prefill and one decode executable each)."""
from __future__ import annotations

import json

import jax
import numpy as np

from masa_jax import sampling
from masa_jax.models import qwen
from masa_jax.parallel.mesh import make_mesh
from masa_jax.parallel.rules import TRAIN_RULES, tree_shardings


def main():
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.3)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 128, n).tolist() for n in (3, 9, 1, 14, 6, 2)]
    budgets = [8, 3, 8, 1, 6, 8]
    kw = dict(rng=jax.random.key(5), max_new_tokens=8, budgets=budgets, num_slots=8, max_cache_len=64)
    ref_greedy = sampling.generate(cfg, params, prompts, temperature=0.0, **kw)

    mesh = make_mesh((1, 2, 2))
    train = jax.device_put(params, tree_shardings(qwen.param_logical_axes(cfg), qwen.param_shapes(cfg), mesh,
                                                  TRAIN_RULES))
    sp = sampling.to_sampling_params(cfg, train, mesh=mesh)
    greedy = sampling.generate(cfg, sp, prompts, temperature=0.0, mesh=mesh, **kw)
    cost = sampling.measure_reshard(cfg, train, mesh)
    spec = lambda x: [None if a is None else str(a) for a in x.sharding.spec]
    result = dict(
        device_count=jax.device_count(),
        train_q_spec=spec(train["layers"]["q_proj"]), sampling_q_spec=spec(sp["layers"][0]["q_proj"]),
        sampling_embed_spec=spec(sp["embed"]), sampling_dtype=str(sp["layers"][1]["q_proj"].dtype),
        greedy_equal=greedy.tokens == ref_greedy.tokens,
        reasons_equal=greedy.finish_reasons == ref_greedy.finish_reasons,
        max_logprob_diff=float(max(np.abs(a - b).max() for a, b in zip(greedy.logprobs, ref_greedy.logprobs))),
        reshard=cost)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
