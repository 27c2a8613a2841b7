"""LoRA train step + sampling reshard on a (2, 2, 2) mesh of 8 fake CPU devices against one device (run by
test_lora_sharded.py with XLA_FLAGS set; argv[1]: the base quantization, "" = dense base with merged
sampling weights, else a QLoRA base the sampler keeps quantized): prints RESULT {json}."""
import json
import sys

import jax, jax.numpy as jnp, numpy as np
from masa_jax.models import qwen
from masa_jax.models.qwen import lora
from masa_jax.models.qwen.model import dense
from masa_jax.parallel import mesh as mesh_lib
from masa_jax.rl import train_step as ts
from masa_jax.sampling.reshard import to_sampling_params
cfg = qwen.ModelConfig(family="qwen3", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128, eos_token_id=1)
params = jax.device_get(qwen.init_params(cfg, jax.random.key(0)))
lc = lora.LoraConfig(rank=4, alpha=8.0, base_quantization=sys.argv[1] if len(sys.argv) > 1 else "")
res = {}
for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = mesh_lib.make_mesh(shape) if shape != (1,1,1) else jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1,1,1), ("data","fsdp","tensor"))
    optim = ts.OptimConfig(lr=1e-2, warmup_steps=0)
    st = ts.create_train_state(cfg, params, optim, mesh, lora_cfg=lc, lora_rng=jax.random.key(3))
    st = st.replace(params=jax.device_put(jax.tree.map(lambda x: x + 0.05, jax.device_get(st.params)), ts.adapter_shardings(cfg, lc, mesh)))
    rng = np.random.RandomState(0)
    tok = rng.randint(0, 64, (8, 16)).astype(np.int32); m = np.ones((8, 16), bool); lm = m.copy(); lm[:, :8] = False
    b = {"tokens": tok, "attention_mask": m, "loss_mask": lm, "advantages": np.linspace(-1, 1, 8).astype(np.float32)}
    clp = ts.make_compute_logprobs(cfg, mesh, 4, chunk_size=8, lora_cfg=lc)
    old, _ = clp(ts.policy_params(st, lc), b); b["old_logprobs"] = old
    step = ts.make_train_step(cfg, ts.LossConfig(chunk_size=8, kl_coef=0.1), optim, mesh, 4, lora_cfg=lc)
    st2, met = step(st, b)
    sp = to_sampling_params(cfg, ts.policy_params(st2, lc), mesh=mesh)
    res[shape] = (float(met["loss"]), float(met["grad_norm"]), jax.device_get(st2.params), jax.device_get(dense(sp["layers"][1]["q_proj"], jnp.float32)),
                  type(sp["layers"][1]["q_proj"]).__name__)
a, b_ = res[(1,1,1)], res[(2,2,2)]
print("RESULT " + json.dumps({
    "devices": jax.device_count(), "loss": [a[0], b_[0]], "grad_norm": [a[1], b_[1]],
    "adapter_err": float(max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b_[2])))),
    "moved": float(np.abs(a[2]["layers"]["q_proj"]["b"] - 0.05).max()),
    "merged_q_err": float(np.abs(a[3] - b_[3]).max()), "sampling_q_type": b_[4]}))
