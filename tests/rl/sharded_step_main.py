"""Run by test_train_step_sharded.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set
before jax is imported). Trains the same tiny model on a 1-device mesh and on a (2, 2, 2) mesh (old
log-probs recomputed, then an RL step with a KL term, twice) and prints one JSON object with the
differences, the shardings and the compilation counts for the test to check.
"""
import json
import os

import jax
import numpy as np

from masa_jax.models.qwen import ModelConfig, init_params
from masa_jax.parallel.mesh import make_mesh
from masa_jax.rl import batching, train_step as ts

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
assert jax.device_count() == 8, jax.devices()

# Every sharded dim divisible by its mesh axes: hidden 32 / fsdp 2, vocab 64, mlp 64, heads 4, kv 2 / tensor 2.
CFG = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
LOSS = ts.LossConfig(chunk_size=8, kl_coef=0.05, entropy_metric=True)
# Adam eps 1e-4, not 1e-8: with a tiny eps the first update is ~ g / |g| per element, which turns the
# float32 reduction-order noise of gradients that cancel to ~1e-9 into full-size update differences;
# that is Adam's conditioning, not the sharding's. Adam's first moment (the gradient) is compared too.
OPTIM = ts.OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-4)
N, T, MICRO = 8, 16, 4   # micro-batch of 4 = the data-parallel size data x fsdp of the (2, 2, 2) mesh


def make_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)
    attn, loss = np.zeros((N, T), bool), np.zeros((N, T), bool)
    for i in range(N):
        start, prompt_end, end = int(rng.integers(0, 3)), int(rng.integers(4, 8)), int(rng.integers(9, T + 1))
        attn[i, start:end] = True
        loss[i, prompt_end:end] = True
    tokens[~attn] = 0
    return dict(tokens=tokens, attention_mask=attn, loss_mask=loss,
                advantages=rng.normal(size=N).astype(np.float32))


def grouped_sequences():
    """4 problems x 4 rollouts sharing each problem's prompt (the shared-prefix layout's case)."""
    rng = np.random.default_rng(1)
    prompts, responses = [], []
    for _ in range(4):
        prompt = rng.integers(1, CFG.vocab_size, int(rng.integers(3, 8))).tolist()
        for _ in range(4):
            prompts.append(prompt)
            responses.append(rng.integers(1, CFG.vocab_size, int(rng.integers(2, 8))).tolist())
    return prompts, responses, rng.normal(size=len(prompts)).astype(np.float32)


def run(mesh, params, batch, micro=MICRO):
    state = ts.create_train_state(CFG, params, OPTIM, mesh, keep_reference=True)
    clp = ts.make_compute_logprobs(CFG, mesh, micro, chunk_size=LOSS.chunk_size)
    step = ts.make_train_step(CFG, LOSS, OPTIM, mesh, micro)
    metrics, grads = [], []
    with jax.set_mesh(mesh):
        for _ in range(2):
            lp, lm = clp(state.params, batch)
            state, m = step(state, dict(batch, old_logprobs=lp))
            lm = {f"old_logprobs/{k}": v for k, v in jax.device_get(lm).items()}
            metrics.append({**lm, **jax.device_get(m)})
            if not grads:  # after one step Adam's first moment is (1 - b1) * the clipped gradient
                grads.append(jax.device_get(state.opt_state[1].mu))
    expected = ts.state_shardings(CFG, OPTIM, mesh, keep_reference=True)
    same = jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, state, expected))
    compiles = [f.jitted._cache_size() for f in (clp, step)]
    return state, metrics, grads[0], all(same), compiles


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    params = jax.device_get(init_params(CFG, jax.random.key(0), std=0.05))
    batch = make_batch()
    s1, m1, g1, _, c1 = run(make_mesh((1, 1, 1), devices=jax.devices()[:1]), params, batch)
    s8, m8, g8, same8, c8 = run(make_mesh((2, 2, 2)), params, batch)
    q = s8.params["layers"]["q_proj"]
    # The shared-prefix layout on the (2, 2, 2) mesh (blocks of 2 rows, one per data-parallel device per
    # micro-batch of 8) against the row layout on one device: the same two updates.
    prompts, responses, adv = grouped_sequences()
    rows = batching.pack_sequences(prompts, responses, pad_id=0, row_multiple=8, advantages=adv)
    shared, _ = batching.pack_shared(prompts, responses, pad_id=0, rows_per_block=2, block_multiple=4,
                                     advantages=adv)
    r1, rm1, rg1, _, _ = run(make_mesh((1, 1, 1), devices=jax.devices()[:1]), params, rows, micro=8)
    p8, pm8, pg8, psame8, pc8 = run(make_mesh((2, 2, 2)), params, shared, micro=8)
    out = {
        "devices": jax.device_count(),
        "grad_err": max(jax.tree.leaves(jax.tree.map(rel_err, g8, g1))),
        "param_err": max(jax.tree.leaves(jax.tree.map(rel_err, s8.params, s1.params))),
        "opt_err": max(jax.tree.leaves(jax.tree.map(rel_err, s8.opt_state, s1.opt_state))),
        "ref_err": max(jax.tree.leaves(jax.tree.map(rel_err, s8.ref_params, s1.ref_params))),
        "moved": max(jax.tree.leaves(jax.tree.map(rel_err, s1.params, params))),
        "metrics_differing": [(k, float(a[k]), float(b[k])) for a, b in zip(m8, m1) for k in b
                              if not abs(float(a[k]) - float(b[k])) <= 1e-5 * abs(float(b[k])) + 1e-6],
        "num_metrics": len(m1[0]),
        "kl_loss": [float(m["kl_loss"]) for m in m8],
        # Entropy of the same params on the same batch, from the old-log-prob pass and from inside the
        # first update's forward (LossConfig.entropy_metric).
        "entropy_pair": [float(m8[0]["old_logprobs/entropy"]), float(m8[0]["entropy"])],
        "skipped": [float(m["skipped"]) for m in m1 + m8],
        "steps": [int(s1.step), int(s8.step)],
        "shardings_as_configured": same8,
        "q_proj_spec": str(q.sharding.spec),
        "q_proj_mu_spec": str(s8.opt_state[1].mu["layers"]["q_proj"].sharding.spec),
        "embed_spec": str(s8.params["embed"].sharding.spec),
        "ref_q_proj_spec": str(s8.ref_params["layers"]["q_proj"].sharding.spec),
        "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
        "q_proj_shape": list(q.shape),
        "compiles_1": c1,
        "compiles_8": c8,
        "shared_blocks": list(shared["tokens"].shape[:2]) + [int(shared["prefix_tokens"].shape[1])],
        "shared_grad_err": max(jax.tree.leaves(jax.tree.map(rel_err, pg8, rg1))),
        "shared_param_err": max(jax.tree.leaves(jax.tree.map(rel_err, p8.params, r1.params))),
        "shared_metrics_differing": [(k, float(a[k]), float(b[k])) for a, b in zip(pm8, rm1) for k in b
                                     if not abs(float(a[k]) - float(b[k])) <= 1e-5 * abs(float(b[k])) + 1e-6],
        "shared_shardings_as_configured": psame8,
        "shared_compiles_8": pc8,
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
