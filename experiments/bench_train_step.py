"""Train-step throughput and MFU: masa_jax's jitted RL step against transformers + torch AdamW.

Both sides run the same model shape, batch and loss (PPO clipped surrogate, token-mean, clip-higher and
dual clip, AdamW with weight decay and global-norm clipping) on random weights, in one process:

    python experiments/bench_train_step.py --device cpu              # small Qwen3 shape, float32
    python experiments/bench_train_step.py --device gpu              # Qwen3-1.7B shape, 4 x 2048 tokens,
                                                                     # bf16 compute / f32 master, full remat,
                                                                     # cuDNN attention

Model FLOPs per token (the MFU numerator, counting only what the model needs, not remat recompute):
    6 * N_matmul + 6 * L * T * H * hd
N_matmul = the weights that take part in matmuls (every layer's q/k/v/o and MLP, plus the unembedding;
the embedding lookup is no matmul), and the second term is causal attention (QK^T and AV over on average
T/2 keys, forward + backward = 3x forward). MFU = model FLOPs per step / step time / peak FLOP/s.

Peak: on GPU the dense bf16 peak of the card (H100 / H200 SXM: 989 TFLOP/s, or --peak-flops). On CPU the
script measures it: the best float32 matmul throughput (4096^2 matmuls, JAX and torch, taking the larger)
on this machine at run time, and also prints the nominal peak from --cpu-ghz x cores x 64 (two AVX-512
FMA units x 16 lanes x 2 flops per cycle).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from masa_jax.models.qwen import ModelConfig, init_params
from masa_jax.parallel.mesh import make_mesh
from masa_jax.rl import train_step as ts

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

PRESETS = {
    # A Qwen3-shaped model small enough for a 2-core CPU to run a few steps in about a minute.
    "cpu": dict(model=dict(family="qwen3", vocab_size=16384, hidden_size=512, intermediate_size=1536,
                           num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, tie_word_embeddings=True,
                           dtype="float32", remat="none", attention_impl="xla"),
                batch=4, seq=512, micro_batch=4, chunk=512, steps=3),
    # Qwen3-1.7B(-Base) config.json shape.
    "gpu": dict(model=dict(family="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                           num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
                           dtype="bfloat16", remat="full", attention_impl="cudnn"),
                batch=4, seq=2048, micro_batch=4, chunk=512, steps=10),
}


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    n_matmul = cfg.num_layers * per_layer + d * v
    attention = 6 * cfg.num_layers * seq * cfg.num_heads * hd
    return 6 * n_matmul + attention


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length sequences: a quarter prompt, the rest response (loss) tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 4:] = True
    return dict(tokens=tokens, attention_mask=np.ones((batch, seq), bool), loss_mask=loss_mask,
                advantages=rng.normal(size=batch).astype(np.float32))


def measure_cpu_matmul_peak(n: int = 4096, reps: int = 3) -> dict:
    """Best float32 matmul FLOP/s on this CPU, from JAX (XLA:CPU) and torch."""
    flops = 2 * n ** 3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best_jax = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        best_jax = max(best_jax, flops / (time.perf_counter() - t))
    out = {"jax_matmul_flops": best_jax}
    try:
        import torch
        x = torch.randn(n, n)
        torch.mm(x, x)
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(x, x)
            best = max(best, flops / (time.perf_counter() - t))
        out["torch_matmul_flops"] = best
    except ImportError:
        pass
    out["peak_flops"] = max(out.values())
    return out


def setup_jax(cfg: ModelConfig, preset: dict, optim: ts.OptimConfig, loss: ts.LossConfig) -> tuple:
    """Builds state and jitted functions, runs the first (compiling) calls; returns (one_step, info)
    where one_step() runs one train step to completion and returns its metrics."""
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    psh = ts.param_shardings(cfg, mesh)
    params = jax.jit(lambda k: init_params(cfg, k), out_shardings=psh)(jax.random.key(0))
    holder = {"state": ts.create_train_state(cfg, params, optim, mesh)}
    del params
    clp = ts.make_compute_logprobs(cfg, mesh, preset["micro_batch"], chunk_size=loss.chunk_size)
    step = ts.make_train_step(cfg, loss, optim, mesh, preset["micro_batch"])
    batch = make_batch(cfg, preset["batch"], preset["seq"])
    with jax.set_mesh(mesh):
        t = time.perf_counter()
        old, _ = clp(holder["state"].params, batch)
        jax.block_until_ready(old)
        clp_first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(clp(holder["state"].params, batch))
        clp_s = time.perf_counter() - t
    batch = dict(batch, old_logprobs=old)

    def one_step():
        with jax.set_mesh(mesh):
            holder["state"], m = step(holder["state"], batch)
            jax.block_until_ready((holder["state"], m))
        return m

    t = time.perf_counter()
    one_step()
    first = time.perf_counter() - t
    return one_step, {"first_call_s": first, "old_logprobs_s": clp_s, "old_logprobs_first_call_s": clp_first}


def setup_torch(cfg: ModelConfig, preset: dict, optim: ts.OptimConfig, loss: ts.LossConfig, device: str) -> tuple:
    """transformers Qwen3ForCausalLM + torch.optim.AdamW, same loss; float32 on CPU, float32 master
    weights with bf16 autocast, SDPA attention and gradient checkpointing on GPU. Returns (one_step,
    info) like `setup_jax`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev = "cuda" if device == "gpu" else "cpu"
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
                         max_position_embeddings=max(preset["seq"], 4096), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_cfg).to(dev).float().train()
    if cfg.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
    b = make_batch(cfg, preset["batch"], preset["seq"])
    tokens = torch.tensor(b["tokens"], dtype=torch.long, device=dev)
    attn = torch.tensor(b["attention_mask"], dtype=torch.long, device=dev)
    mask = torch.tensor(b["loss_mask"], dtype=torch.float32, device=dev)[:, 1:]
    adv = torch.tensor(b["advantages"], device=dev)[:, None]
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def logprobs():
        with autocast:
            logits = model(input_ids=tokens, attention_mask=attn).logits
        logp = torch.log_softmax(logits[:, :-1].float() / loss.temperature, -1)
        return torch.gather(logp, -1, tokens[:, 1:, None])[..., 0]  # [B, T - 1]: token t+1 given <= t

    with torch.no_grad():
        old = logprobs()

    def one_step():
        opt.zero_grad(set_to_none=True)
        ratio = torch.exp(torch.clamp(logprobs() - old, -20, 20))
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - loss.clip_low, 1 + loss.clip_high))
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * loss.clip_c), pg)
        value = (pg * mask).sum() / mask.sum()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
        opt.step()
        return value

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        value = one_step()
        sync()
        return {"loss": value.detach()}

    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    return run, {"first_call_s": first, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (after one compile / warm-up step)")
    ap.add_argument("--peer", choices=("torch", "none"), default="torch")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--remat", choices=("none", "full", "save_dots"), default=None)
    ap.add_argument("--peak-flops", type=float, default=None, help="override the peak FLOP/s used for MFU")
    ap.add_argument("--cpu-ghz", type=float, default=2.1, help="nominal CPU clock for the nominal peak")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    preset = dict(PRESETS[args.device])
    for key in ("batch", "seq", "micro_batch", "steps"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    model_kw = dict(preset["model"])
    if args.remat is not None:
        model_kw["remat"] = args.remat
    cfg = ModelConfig(**model_kw)
    if args.device == "gpu" and jax.devices()[0].platform != "gpu":
        raise SystemExit("--device gpu needs a CUDA jax (pip install -e '.[gpu]')")
    optim = ts.OptimConfig()  # paper defaults; the step's cost does not depend on the values
    loss = ts.LossConfig(chunk_size=preset["chunk"])

    info = {"device": args.device, "jax_device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "batch": preset["batch"], "seq": preset["seq"], "micro_batch": preset["micro_batch"],
            "model": model_kw, "num_params": cfg.num_params()}
    if args.device == "cpu":
        info.update(measure_cpu_matmul_peak())
        info["nominal_peak_flops"] = args.cpu_ghz * 1e9 * os.cpu_count() * 64
    else:
        kind = jax.devices()[0].device_kind
        info["peak_flops"] = next((v for k, v in GPU_PEAK_BF16.items() if k in kind), None)
    if args.peak_flops:
        info["peak_flops"] = args.peak_flops
    peak = info["peak_flops"]
    if not peak:
        raise SystemExit(f"unknown peak for {info['jax_device']!r}: pass --peak-flops")

    tokens = preset["batch"] * preset["seq"]
    flops = model_flops_per_token(cfg, preset["seq"]) * tokens
    info["model_flops_per_step"] = flops
    runners = {"masa_jax": setup_jax(cfg, preset, optim, loss)}
    if args.peer == "torch":
        import torch
        if args.device == "gpu" and not torch.cuda.is_available():
            print("torch has no CUDA here: the transformers peer is skipped")
        else:
            runners["transformers+torch"] = setup_torch(cfg, preset, optim, loss, args.device)
    # Alternating rounds, medians: load from other processes on a shared machine hits both alike.
    times, last = {name: [] for name in runners}, {}
    for _ in range(preset["steps"]):
        for name, (run, _) in runners.items():
            t = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - t)
        if args.device == "cpu":  # sample the matmul peak between rounds too; keep the best seen
            info["peak_flops"] = peak = max(peak, measure_cpu_matmul_peak(reps=1)["peak_flops"])
    results = {}
    for name, (_, extra) in runners.items():
        step_s = float(np.median(times[name]))
        r = {"step_s": step_s, "step_times": times[name], **extra, "tokens_per_s": tokens / step_s,
             "mfu": flops / step_s / peak, "last_loss": float(last[name]["loss"])}
        if "nominal_peak_flops" in info:
            r["mfu_nominal_peak"] = flops / step_s / info["nominal_peak_flops"]
        results[name] = r
    print(json.dumps({"info": info, "results": results}, indent=1))
    print(f"\n{'impl':<22}{'step s':>9}{'tokens/s':>11}{'MFU':>8}   (peak {peak / 1e9:.0f} GFLOP/s, "
          f"{flops / 1e9:.1f} GFLOP/step, {tokens} tokens/step)")
    for name, r in results.items():
        print(f"{name:<22}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{100 * r['mfu']:>7.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
