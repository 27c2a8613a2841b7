"""Decode speed of a LoRA policy with merged (W + alpha/r A B, the trainer's choice) against unmerged
weights (the low-rank path x A B added in every target projection at every decode step)
(docs/benchmarks.md, "LoRA sampling").

    python experiments/bench_lora_sampling.py [--rank 8] [--rounds 5] [--model DIR]

Model: the shipped toy base model (masa_jax/toy/assets/base_model, 0.8 M params) with rank-r adapters on
all seven projections (B moved off zero, so both layouts compute the same non-trivial policy), float32 on
CPU; 64 prompts of 48 tokens, 96 new tokens each, greedy, no EOS, 64 slots. Both layouts are warmed up
(compiled) first, then timed in alternating rounds; medians of decode tokens / second are reported, and
the merge itself (`to_sampling_params`, which merges in its jitted reshard) is timed too. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def main():
    from masa_jax.models import qwen
    from masa_jax.models.qwen import lora
    from masa_jax.sampling.generate import SamplerConfig, generate
    from masa_jax.sampling.reshard import to_sampling_params
    from masa_jax.toy import defaults

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=defaults.BASE_MODEL_DIR)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=96)
    args = ap.parse_args()

    cfg, params = qwen.from_pretrained(args.model)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    ad = lora.init_adapters(cfg, lcfg, jax.random.key(0))
    ad = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), ad)
    policy = lora.attach(params, ad, lcfg)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, cfg.vocab_size, 48)) for _ in range(args.prompts)]
    sampler = SamplerConfig(temperature=0.0, eos_ids=(), num_slots=args.prompts)

    layouts = {}
    merge_s = {}
    for name, merge in (("merged", True), ("unmerged", False)):
        jax.block_until_ready(to_sampling_params(cfg, policy, merge_lora=merge))  # compile
        t0 = time.perf_counter()
        layouts[name] = jax.block_until_ready(to_sampling_params(cfg, policy, merge_lora=merge))
        merge_s[name] = time.perf_counter() - t0
    outs, times = {}, {k: [] for k in layouts}
    for name, sp in layouts.items():  # warm-up: compiles prefill / decode for this layout
        outs[name] = generate(cfg, sp, prompts, rng=jax.random.key(0), max_new_tokens=args.new_tokens, sampler=sampler)
    same = [list(t) for t in outs["merged"].tokens] == [list(t) for t in outs["unmerged"].tokens]
    for _ in range(args.rounds):
        for name, sp in layouts.items():
            t0 = time.perf_counter()
            generate(cfg, sp, prompts, rng=jax.random.key(0), max_new_tokens=args.new_tokens, sampler=sampler)
            times[name].append(time.perf_counter() - t0)
    n_tokens = args.prompts * args.new_tokens
    rec = {"rank": args.rank, "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "identical_greedy_tokens": same}
    for name in layouts:
        med = float(np.median(times[name]))
        rec[f"{name}_s"] = round(med, 4)
        rec[f"{name}_tokens_per_s"] = round(n_tokens / med, 1)
        rec[f"{name}_to_sampling_params_s"] = round(merge_s[name], 4)
        print(f"{name:>9}: {n_tokens / med:9.1f} tokens/s (median of {args.rounds}: {med:.3f} s), "
              f"to_sampling_params {merge_s[name] * 1e3:.1f} ms")
    rec["unmerged_over_merged_time"] = round(rec["unmerged_s"] / rec["merged_s"], 3)
    print(f"greedy tokens identical: {same}; unmerged / merged time: {rec['unmerged_over_merged_time']}")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
