"""The update with and without prefix sharing (issue 23 item 4, update side), measured in one run.

    python experiments/bench_update_prefix_sharing.py [--problems 4 --group 8 --prompt 448 --new 64 --reps 3]

A GRPO step trains on G rollouts of each of P problems, G per prompt. In the row layout every rollout
carries its own copy of the prompt through the forward and backward; in the shared-prefix layout
(`rl.prefix_sharing`, the default: `batching.pack_shared`, `model.shared_prefix_hidden_states`) each
block of micro_batch_size rows computes its prompts once. Same random Qwen3 weights (bench_sampler.py's
CPU shape: hidden 256, 4 layers, 4 / 2 heads, head_dim 64, ffn 768, vocab 1024, float32); responses of
random lengths in [new / 2, new]; micro-batch = one problem's G rollouts. Timed: the old-log-prob pass
and one RL train step, each layout warmed up (compiles excluded), then A B B A rounds, medians.
Cross-check: both layouts give the same loss and gradient norm. Last line: a JSON record.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prefix_sharing import SHAPE  # noqa: E402  the sampler-side benchmark's model
from masa_jax.models import qwen  # noqa: E402
from masa_jax.parallel.mesh import make_mesh  # noqa: E402
from masa_jax.rl import batching, train_step as ts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--group", type=int, default=8, help="rollouts per problem (G)")
    ap.add_argument("--prompt", type=int, default=448, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="the longest response")
    ap.add_argument("--reps", type=int, default=3, help="timed A B B A rounds")
    args = ap.parse_args()

    cfg = qwen.ModelConfig(**SHAPE)
    params = jax.device_get(qwen.init_params(cfg, jax.random.key(0)))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rs = np.random.RandomState(0)
    prompts, responses = [], []
    for _ in range(args.problems):
        prompt = rs.randint(1, cfg.vocab_size, args.prompt).tolist()
        for _ in range(args.group):
            prompts.append(prompt)
            responses.append(rs.randint(1, cfg.vocab_size, rs.randint(args.new // 2, args.new + 1)).tolist())
    adv = rs.normal(size=len(prompts)).astype(np.float32)
    micro = args.group
    buckets = batching.default_buckets(args.prompt + args.new)
    loss_cfg = ts.LossConfig()
    optim = ts.OptimConfig(lr=1e-5, warmup_steps=0)
    step = ts.make_train_step(cfg, loss_cfg, optim, mesh, micro)
    old_fn = ts.make_compute_logprobs(cfg, mesh, micro, chunk_size=loss_cfg.chunk_size)

    rows = batching.pack_sequences(prompts, responses, pad_id=0, row_multiple=micro, buckets=buckets, advantages=adv)
    shared, _ = batching.pack_shared(prompts, responses, pad_id=0, rows_per_block=micro, buckets=buckets,
                                     advantages=adv)
    batches = {"shared": jax.device_put(shared), "rows": jax.device_put(rows)}
    tokens = {"shared": shared["prefix_tokens"].size + shared["tokens"].size, "rows": rows["tokens"].size}
    for k, b in batches.items():  # old log-probs once, with the initial params (as Updater does)
        b["old_logprobs"] = old_fn(params, b)[0]

    def run(kind: str):
        b = batches[kind]
        t0 = time.perf_counter()
        jax.block_until_ready(old_fn(params, b))
        state = ts.create_train_state(cfg, params, optim, mesh)  # the step donates it
        jax.block_until_ready(state.params)
        t1 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(state.params)
        return t1 - t0, time.perf_counter() - t1, jax.device_get(m)

    first = {k: run(k) for k in batches}  # warm-up: compiles
    for k in batches:
        run(k)
    loss = {k: float(first[k][2]["loss"]) for k in first}
    gnorm = {k: float(first[k][2]["grad_norm"]) for k in first}
    ok = abs(loss["shared"] - loss["rows"]) <= 1e-5 * max(abs(loss["rows"]), 1e-3) + 1e-7 and \
        abs(gnorm["shared"] - gnorm["rows"]) <= 1e-4 * gnorm["rows"]
    times: dict[str, list] = {k: [] for k in batches}
    olds: dict[str, list] = {k: [] for k in batches}
    for _ in range(args.reps):
        for kind in ("shared", "rows", "rows", "shared"):
            t_old, t_step, _ = run(kind)
            olds[kind].append(t_old)
            times[kind].append(t_step)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_old = {k: statistics.median(v) for k, v in olds.items()}
    print(f"{args.problems} problems x {args.group} rollouts, prompt {args.prompt}, responses "
          f"{args.new // 2}-{args.new} tokens, micro-batch {micro}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print("| | shared prefix | rows | rows / shared |")
    print("|---|---:|---:|---:|")
    print(f"| train step, s (median) | {med['shared']:.3f} | {med['rows']:.3f} | {med['rows'] / med['shared']:.2f} |")
    print(f"| old-log-prob pass, s | {med_old['shared']:.3f} | {med_old['rows']:.3f} | "
          f"{med_old['rows'] / med_old['shared']:.2f} |")
    print(f"| tokens through the forward | {tokens['shared']:,} | {tokens['rows']:,} | "
          f"{tokens['rows'] / tokens['shared']:.2f} |")
    print(f"cross-check {'PASS' if ok else 'FAIL'}: loss {loss['shared']:.8f} vs {loss['rows']:.8f}, "
          f"grad norm {gnorm['shared']:.7f} vs {gnorm['rows']:.7f}")
    print(json.dumps({"bench": "update_prefix_sharing", "problems": args.problems, "group": args.group,
                      "prompt": args.prompt, "new": args.new, "shared_step_s": med["shared"],
                      "rows_step_s": med["rows"], "shared_old_s": med_old["shared"], "rows_old_s": med_old["rows"],
                      "speedup_step": med["rows"] / med["shared"], "tokens": tokens, "cross_check": ok,
                      "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
