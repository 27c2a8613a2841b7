"""Rollout time with and without prefix sharing in the sampler (issue 23 item 4), measured in one run.

    python experiments/bench_prefix_sharing.py [--problems 8 --group 16 --prompt 512 --new 64 --reps 3]

A GRPO / MASA step samples G rollouts of each of P problems: P x G requests, G per prompt. With
`SamplerConfig.share_prompts` (the default) a refill runs each distinct prompt's prefill once and every
request of the group draws its own tokens from the shared logits; without it every request prefills its
own copy. Same random Qwen3 weights (bench_sampler.py's CPU shape: hidden 256, 4 layers, 4 / 2 heads,
head_dim 64, ffn 768, vocab 1024, float32), temperature 1, no EOS (every request generates --new tokens),
P x G slots. Both settings are warmed up (compiles excluded), then timed alternating A B B A; medians.
The rows are checked identical (sharing changes the work, not the samples). Last line: a JSON record.
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
from masa_jax import sampling  # noqa: E402
from masa_jax.models import qwen  # noqa: E402

SHAPE = dict(family="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64, tie_word_embeddings=True, max_position_embeddings=40960)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--group", type=int, default=16, help="rollouts per problem (G)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per rollout")
    ap.add_argument("--reps", type=int, default=3, help="timed A B B A rounds")
    args = ap.parse_args()

    cfg = qwen.ModelConfig(**SHAPE)
    params = sampling.to_sampling_params(cfg, qwen.init_params(cfg, jax.random.key(0)))
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, cfg.vocab_size, args.prompt).tolist() for _ in range(args.problems)]
    requests = [p for p in prompts for _ in range(args.group)]
    n = len(requests)

    def run(share: bool):
        sc = sampling.SamplerConfig(temperature=1.0, num_slots=n, share_prompts=share)
        t0 = time.perf_counter()
        out = sampling.generate(cfg, params, requests, rng=jax.random.key(1), max_new_tokens=args.new, sampler=sc)
        return time.perf_counter() - t0, out

    outs = {share: run(share)[1] for share in (True, False)}  # warm-up: compiles
    assert outs[True].tokens == outs[False].tokens, "prefix sharing changed the samples"
    times: dict[bool, list] = {True: [], False: []}
    prefill: dict[bool, list] = {True: [], False: []}
    for _ in range(args.reps):
        for share in (True, False, False, True):
            seconds, out = run(share)
            times[share].append(seconds)
            prefill[share].append(out.stats.prefill_seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    pre = {k: statistics.median(v) for k, v in prefill.items()}
    rows = {k: outs[k].stats.prefill_rows for k in outs}
    print(f"{args.problems} problems x {args.group} rollouts, prompt {args.prompt}, {args.new} new tokens, "
          f"{n} slots; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("| | shared | unshared | unshared / shared |")
    print("|---|---:|---:|---:|")
    print(f"| generate, s (median) | {med[True]:.3f} | {med[False]:.3f} | {med[False] / med[True]:.2f} |")
    print(f"| of which prefill, s | {pre[True]:.3f} | {pre[False]:.3f} | {pre[False] / max(pre[True], 1e-9):.2f} |")
    print(f"| prefill rows | {rows[True]} | {rows[False]} | |")
    print(json.dumps({"bench": "prefix_sharing", "problems": args.problems, "group": args.group,
                      "prompt": args.prompt, "new": args.new, "shared_s": med[True], "unshared_s": med[False],
                      "shared_prefill_s": pre[True], "unshared_prefill_s": pre[False],
                      "speedup": med[False] / med[True], "load": os.getloadavg()[0],
                      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
