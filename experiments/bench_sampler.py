"""Rollout throughput of `masa_jax.sampling.generate` (issue 3), in four modes.

    python experiments/bench_sampler.py --mode cpu       # vs transformers generate, batch 1 and 64 (CPU, f32)
    python experiments/bench_sampler.py --mode refill    # heavy-tailed budgets: slot refill vs static batches
    python experiments/bench_sampler.py --mode gpu --model qwen3-8b   # bf16 vs transformers + HBM roofline
    python experiments/bench_sampler.py --mode reshard   # training -> sampling layout on 8 fake CPU devices

cpu: Qwen3 shape hidden 256, 4 layers, 4 heads / 2 kv heads, head_dim 64, ffn 768, vocab 1024, tied,
  float32, the same random weights on both sides; prompts of 32 tokens, 128 new tokens, temperature 1
  (transformers: do_sample, top_k=0, top_p=1, no EOS, so both produce exactly batch x 128 tokens).
  All are warmed up (our compiles happen there), then timed in alternating rounds; medians reported.
  transformers runs at torch's default thread count and at 1 thread; the ratio uses the faster.
refill: the cpu model, N requests with budgets drawn log-uniformly from [min, max] (most short, a few
  long: MASA's cutoff budgets), S slots, temperature 1, no EOS. Useful (generated) tokens per second with
  slot refill (default schedule: longest budget first) against static batches of S requests in input
  order (the behaviour of samplers with one shared step counter). Compile time, measured through
  jax.monitoring, is subtracted and reported separately.
gpu: Qwen3-1.7B / Qwen3-8B shapes, random bf16 weights, batch 64, prompt 128, 256 new tokens. Ours vs
  transformers generate (random weights of its own, the same shapes, when torch sees CUDA), and the
  fraction of the HBM-bandwidth roofline: every decode step must read all weights once plus each
  sequence's KV cache at its current length; roofline time = those bytes / peak bandwidth.
reshard: times `sampling.to_sampling_params` from FSDP x tensor training params on a (1, 4, 2) mesh of
  8 fake CPU devices (re-executes itself with XLA_FLAGS), for the cpu shape and a 150M-param shape.
The last line of each mode is a JSON record for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

CPU_SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
GPU_SHAPES = {  # config.json of the Qwen/Qwen3-* checkpoints
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(CPU_SHAPE),  # a smoke test of the gpu mode's code path on any machine
}
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12,
                   "GH200": 4.0e12, "B200": 8.0e12}


def _hf_config(shape: dict):
    from transformers import Qwen3Config
    return Qwen3Config(**shape, max_position_embeddings=40960, eos_token_id=None, bos_token_id=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def _our_cfg(hf_config, dtype: str):
    from masa_jax.models import qwen
    d = {**hf_config.to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    return qwen.ModelConfig.from_hf_dict(d, param_dtype=dtype, dtype=dtype)


class CompileClock:
    """Sums jax's compile-path durations (tracing, lowering, backend compile) while active."""

    def __init__(self):
        import jax
        self.total = 0.0
        self.on = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kw):
        if self.on and event.startswith("/jax/core/compile/"):
            self.total += duration


def _hf_generate(model, prompts: np.ndarray, new: int, device: str):
    import torch
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    assert out.shape == (len(prompts), prompts.shape[1] + new), out.shape
    return out


def _machine() -> dict:
    import jax
    return {"jax_platform": jax.devices()[0].platform, "jax_device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "loadavg_1m_start": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- cpu


def mode_cpu(args):
    import jax
    import torch
    from transformers import Qwen3ForCausalLM

    from masa_jax import sampling
    from masa_jax.models.qwen.params import params_from_state_dict

    hf_config = _hf_config(CPU_SHAPE)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_config).eval()
    cfg = _our_cfg(hf_config, "float32")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    sp = sampling.to_sampling_params(cfg, jax.tree.map(jax.numpy.asarray, params_from_state_dict(cfg, state)))
    default_threads = torch.get_num_threads()
    record = {"benchmark": "sampler_cpu", **_machine(), "shape": CPU_SHAPE, "dtype": "float32",
              "prompt": args.prompt, "new_tokens": args.new, "temperature": 1.0, "rounds": args.rounds,
              "torch_threads": default_threads}
    for B in args.batches:
        prompts = np.random.RandomState(B).randint(0, CPU_SHAPE["vocab_size"], (B, args.prompt))
        plist = prompts.tolist()
        seed = [0]

        def ours():
            seed[0] += 1
            out = sampling.generate(cfg, sp, plist, rng=jax.random.key(seed[0]), max_new_tokens=args.new,
                                    temperature=1.0, num_slots=B)
            assert sum(len(t) for t in out.tokens) == B * args.new
            return out

        def hf(threads):
            def call():
                torch.set_num_threads(threads)
                try:
                    return _hf_generate(model, prompts, args.new, "cpu")
                finally:
                    torch.set_num_threads(default_threads)
            return call

        # torch at its default thread count and at one thread: OpenMP's barriers degrade badly when other
        # processes share the cores, so the faster of the two is the baseline (the conservative ratio).
        calls = {"masa_jax": ours, f"transformers_{default_threads}t": hf(default_threads)}
        if default_threads > 1:
            calls["transformers_1t"] = hf(1)
        for call in calls.values():  # warm-up: our compiles, torch's first-call costs
            call()
        times = {k: [] for k in calls}
        for _ in range(args.rounds):
            for k, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t0)
        tps = {k: B * args.new / float(np.median(v)) for k, v in times.items()}
        best_hf = max((k for k in tps if k != "masa_jax"), key=tps.get)
        ratio = tps["masa_jax"] / tps[best_hf]
        line = "   ".join(f"{k} {v:7.0f} tok/s" for k, v in tps.items())
        print(f"batch {B:3d}: {line}   ratio vs {best_hf}: {ratio:.2f}x   (medians of {args.rounds}; "
              f"rounds s: " + "; ".join(f"{k} {[round(t, 3) for t in v]}" for k, v in times.items()) + ")",
              flush=True)
        record[f"batch{B}"] = {**{f"{k}_tok_s": v for k, v in tps.items()}, "baseline": best_hf, "ratio": ratio,
                               **{f"{k}_s": v for k, v in times.items()}}
    record["loadavg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(record))


# ------------------------------------------------------------------------------------------- refill


def mode_refill(args):
    import jax

    from masa_jax import sampling
    from masa_jax.models import qwen

    cfg = _our_cfg(_hf_config(CPU_SHAPE), "float32")
    sp = sampling.to_sampling_params(cfg, qwen.init_params(cfg, jax.random.key(0)))
    rs = np.random.RandomState(0)
    budgets = np.exp(rs.uniform(math.log(args.min_budget), math.log(args.max_budget + 1), args.requests))
    budgets = np.minimum(budgets.astype(int), args.max_budget).tolist()
    prompts = rs.randint(0, CPU_SHAPE["vocab_size"], (args.requests, args.prompt)).tolist()
    clock = CompileClock()
    record = {"benchmark": "sampler_refill", **_machine(), "shape": CPU_SHAPE, "dtype": "float32",
              "requests": args.requests, "slots": args.slots, "budgets": [args.min_budget, args.max_budget],
              "budget_mean": float(np.mean(budgets)), "prompt": args.prompt}
    runs = {"refill": dict(refill=True), "static": dict(refill=False, schedule="fifo")}
    for name, kw in runs.items():
        clock.total, clock.on = 0.0, True
        t0 = time.perf_counter()
        out = sampling.generate(cfg, sp, prompts, rng=jax.random.key(1), max_new_tokens=args.max_budget,
                                budgets=budgets, temperature=1.0, num_slots=args.slots, **kw)
        wall = time.perf_counter() - t0
        clock.on = False
        useful = sum(len(t) for t in out.tokens)
        assert useful == sum(budgets)
        st = out.stats
        steady = wall - clock.total
        record[name] = {"wall_s": wall, "compile_s": clock.total, "steady_s": steady, "useful_tokens": useful,
                        "useful_tok_s": useful / steady, "decode_steps": st.decode_steps,
                        "decode_calls": st.decode_calls, "prefill_calls": st.prefill_calls,
                        "slot_utilization": st.slot_utilization, "executables": len(st.shapes)}
        print(f"{name:7s}: {useful} useful tokens in {steady:7.1f} s (+{clock.total:5.1f} s compiling) = "
              f"{useful / steady:8.0f} tok/s; {st.decode_steps} decode steps x {args.slots} slots, "
              f"utilization {st.slot_utilization:.2f}, {st.decode_calls} decode / {st.prefill_calls} prefill "
              f"calls, {len(st.shapes)} executables", flush=True)
    ratio = record["refill"]["useful_tok_s"] / record["static"]["useful_tok_s"]
    record["ratio"] = ratio
    record["loadavg_1m_end"] = os.getloadavg()[0]
    print(f"refill / static useful tokens/s: {ratio:.2f}x")
    print(json.dumps(record))


# ---------------------------------------------------------------------------------------------- gpu


def _peak_bandwidth(kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e9
    for name, bw in sorted(HBM_BYTES_PER_S.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return bw
    return None


def mode_gpu(args):
    import jax

    from masa_jax import sampling
    from masa_jax.models import qwen

    shape = GPU_SHAPES[args.model]
    hf_config = _hf_config(shape)
    dtype = "bfloat16"
    cfg = _our_cfg(hf_config, dtype)
    B, P, N = args.gpu_batch, args.gpu_prompt, args.gpu_new
    dev = jax.devices()[0]
    record = {"benchmark": "sampler_gpu", **_machine(), "model": args.model, "dtype": dtype, "batch": B,
              "prompt": P, "new_tokens": N}
    # Training-layout f32 params -> sampling layout (bf16, per layer): also the single-device reshard cost.
    train = jax.jit(qwen.init_params, static_argnums=0)(cfg.replace(param_dtype="float32"), jax.random.key(0))
    cost = sampling.measure_reshard(cfg, train, None, repeats=2)
    del train
    sp = sampling.to_sampling_params(cfg, jax.jit(qwen.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    record["reshard_single_device"] = cost
    prompts = np.random.RandomState(0).randint(0, shape["vocab_size"], (B, P))
    plist = prompts.tolist()
    kw = dict(max_new_tokens=N, temperature=1.0, num_slots=B)
    sampling.generate(cfg, sp, plist, rng=jax.random.key(0), **kw)  # compiles
    times, outs = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        out = sampling.generate(cfg, sp, plist, rng=jax.random.key(r + 1), **kw)
        times.append(time.perf_counter() - t0)
        outs.append(out)
    i = int(np.argsort(times)[len(times) // 2])
    wall, st = times[i], outs[i].stats
    ours_tps = B * N / wall
    # Roofline: per decode step, all weights once + each sequence's cache at its length (bf16).
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(sp))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    steps = N - 1  # the first token comes from prefill
    kv_bytes = sum(B * (P + t) * kv_per_token for t in range(steps))
    ideal_bytes = steps * param_bytes + kv_bytes
    bw = _peak_bandwidth(dev.device_kind, args.hbm_gbps)
    record.update(masa_jax_s=times, masa_jax_tok_s=ours_tps, decode_s=st.decode_seconds,
                  prefill_s=st.prefill_seconds, decode_steps=st.decode_steps, param_bytes=param_bytes,
                  ideal_decode_bytes=ideal_bytes, peak_bytes_per_s=bw)
    print(f"masa_jax {args.model} bf16 batch {B}, prompt {P}, {N} new: {ours_tps:.0f} tok/s "
          f"(median {wall:.2f} s; decode {st.decode_seconds:.2f} s, prefill {st.prefill_seconds:.2f} s)")
    if bw:
        frac_decode = ideal_bytes / bw / st.decode_seconds
        frac_total = ideal_bytes / bw / wall
        record.update(roofline_fraction_decode=frac_decode, roofline_fraction_total=frac_total)
        print(f"HBM roofline ({bw / 1e12:.2f} TB/s, {dev.device_kind}): decode reaches {frac_decode:.1%}, "
              f"whole generate {frac_total:.1%}")
    else:
        print(f"unknown peak bandwidth for {dev.device_kind!r}: pass --hbm_gbps")
    if not args.no_torch:
        import torch
        device = "cuda" if torch.cuda.is_available() else None
        if device is None and args.model == "tiny":
            device = "cpu"
        if device is None:
            print("torch sees no CUDA device: transformers not timed")
        else:
            from transformers import Qwen3ForCausalLM
            torch.manual_seed(0)
            tdtype = torch.bfloat16 if device == "cuda" else torch.float32
            with torch.device(device):  # built directly in bf16 on the device: no f32 copy
                model = Qwen3ForCausalLM._from_config(hf_config, dtype=tdtype).eval()
            _hf_generate(model, prompts, N, device)  # warm-up
            ht = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                _hf_generate(model, prompts, N, device)
                ht.append(time.perf_counter() - t0)
            hf_tps = B * N / float(np.median(ht))
            record.update(transformers_s=ht, transformers_tok_s=hf_tps, ratio=ours_tps / hf_tps)
            print(f"transformers: {hf_tps:.0f} tok/s   ratio {ours_tps / hf_tps:.2f}x")
    print(json.dumps(record))


# ------------------------------------------------------------------------------------------ reshard


def mode_reshard(args):
    import jax
    if jax.device_count() < 8:
        if os.environ.get("_BENCH_SAMPLER_CHILD"):
            raise RuntimeError("fake devices did not appear")
        env = dict(os.environ, _BENCH_SAMPLER_CHILD="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
        sys.exit(subprocess.call([sys.executable, __file__] + sys.argv[1:], env=env))
    from masa_jax import sampling
    from masa_jax.models import qwen
    from masa_jax.parallel.mesh import make_mesh
    from masa_jax.parallel.rules import TRAIN_RULES, tree_shardings

    mesh = make_mesh((1, 4, 2))
    shapes = {"cpu": CPU_SHAPE,
              "150M": dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)}
    record = {"benchmark": "sampler_reshard", **_machine(), "mesh": {"data": 1, "fsdp": 4, "tensor": 2}}
    for name, shape in shapes.items():
        cfg = _our_cfg(_hf_config(shape), "float32")
        sh = tree_shardings(qwen.param_logical_axes(cfg), qwen.param_shapes(cfg), mesh, TRAIN_RULES)
        train = jax.jit(qwen.init_params, static_argnums=0, out_shardings=sh)(cfg, jax.random.key(0))
        for dtype in ("float32", "bfloat16"):
            r = sampling.measure_reshard(cfg, train, mesh, dtype=dtype)
            record[f"{name}_{dtype}"] = r
            print(f"{name:5s} -> {dtype:8s}: {r['seconds'] * 1e3:8.1f} ms; train params "
                  f"{r['param_bytes_in'] / 1e6:.1f} MB, sampling params {r['param_bytes_out'] / 1e6:.1f} MB "
                  f"({r['per_device_bytes_out'] / 1e6:.1f} MB per device)")
    print(json.dumps(record))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cpu", "refill", "gpu", "reshard"), default="cpu")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--min_budget", type=int, default=16)
    ap.add_argument("--max_budget", type=int, default=1024)
    ap.add_argument("--model", choices=sorted(GPU_SHAPES), default="qwen3-8b")
    ap.add_argument("--gpu_batch", type=int, default=64)
    ap.add_argument("--gpu_prompt", type=int, default=128)
    ap.add_argument("--gpu_new", type=int, default=256)
    ap.add_argument("--hbm_gbps", type=float, help="peak HBM bandwidth, GB/s (default: by device kind)")
    ap.add_argument("--no-torch", dest="no_torch", action="store_true", help="gpu mode: skip transformers")
    args = ap.parse_args(argv)
    if args.mode == "gpu":  # jax must not pre-allocate the GPU: transformers runs in the same process
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    {"cpu": mode_cpu, "refill": mode_refill, "gpu": mode_gpu, "reshard": mode_reshard}[args.mode](args)


if __name__ == "__main__":
    main()
