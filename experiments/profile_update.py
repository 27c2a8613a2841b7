"""Where the update's time goes on the bench_peer update shape (issue 23 item 2), masa_jax alone.

    python experiments/profile_update.py [--reps 5]

bench_peer's model (hidden 256, ffn 768, 4 layers, 4 / 2 heads, head_dim 64, vocab 1024, tied, float32,
random weights), 16 x 256 tokens. Times (medians of --reps calls after two warm-up calls) of the jitted
forward and forward + backward of the summed squared final hidden states, with the layers
  scan          the layer scan (`lax.scan`, ModelConfig.scan_unroll = 1: the accelerator configs),
  scan_unroll   `scan_unroll = num_layers` (lax.scan unrolled),
  layer_loop    ModelConfig.scan_layers = False: a Python loop over the stacked layers (configs/tiny.py,
                the CPU config; Tunix loops over its layers too),
  no_attention  the scan with attention replaced by a copy of V (how much of it is attention),
plus the chunked log-probs' forward (`token_logprobs`). Last line: a JSON record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from masa_jax.models import qwen  # noqa: E402
from masa_jax.models.qwen import model as qmodel  # noqa: E402
from masa_jax.models.qwen.attention import sequence_attention  # noqa: E402

CFG = qwen.ModelConfig(family="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    params = qwen.init_params(CFG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (16, 256)), jnp.int32)
    mask = jnp.ones_like(tokens, bool)

    def timed(fn):
        fn(), fn()
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def layers_then_norm(p, x, rope, attend, cfg=CFG):  # the model's own layer stack and final norm
        return jnp.sum(qmodel._scan_layers(cfg, p, x, rope, attend) ** 2)

    def variant(name):
        def f(p):
            rope = qmodel.rope_cos_sin(qmodel.positions_from_mask(mask), CFG.head_dim, CFG.rope_theta)
            x = qmodel.embed(CFG, p, tokens)
            if name == "no_attention":
                copy_v = lambda q, k, v: (jnp.repeat(v, CFG.num_heads // CFG.num_kv_heads, axis=2), None)  # noqa
                return layers_then_norm(p, x, rope, copy_v)
            attend = sequence_attention(CFG, mask)
            cfg = {"scan_unroll": CFG.replace(scan_unroll=CFG.num_layers),
                   "layer_loop": CFG.replace(scan_layers=False)}.get(name, CFG)
            return layers_then_norm(p, x, rope, attend, cfg=cfg)
        return f

    out = {}
    for name in ("scan", "scan_unroll", "layer_loop", "no_attention"):
        fwd, grad = jax.jit(variant(name)), jax.jit(jax.value_and_grad(variant(name)))
        out[name] = {"forward_s": timed(lambda: jax.block_until_ready(fwd(params))),
                     "forward_backward_s": timed(lambda: jax.block_until_ready(grad(params)))}
        print(f"{name:13s} forward {out[name]['forward_s']:.3f} s   forward + backward "
              f"{out[name]['forward_backward_s']:.3f} s", flush=True)
    lp = jax.jit(lambda p: qwen.token_logprobs(CFG, p, tokens, mask, chunk_size=512))
    out["token_logprobs_forward_s"] = timed(lambda: jax.block_until_ready(lp(params)))
    print(f"token_logprobs forward {out['token_logprobs_forward_s']:.3f} s; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}")
    print(json.dumps({"bench": "profile_update", **out, "load": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
