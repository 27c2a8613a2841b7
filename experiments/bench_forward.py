"""Forward throughput of masa_jax's Qwen3 against `transformers` on the same random weights.

    python experiments/bench_forward.py                 # CPU: hidden 256, 4 layers, vocab 1024, 8 x 256, f32
    python experiments/bench_forward.py --device gpu    # Qwen3-1.7B shape, bf16, random weights, 8 x 1024

Both sides compute full-sequence logits [B, T, V] (no KV cache). Ours is jitted and timed after warm-up
compiles; transformers runs under `torch.inference_mode()` after one warm-up call. The two are timed in
alternating rounds and the medians reported, so a busy shared machine skews both alike. On `--device gpu`
transformers runs only if this torch build sees CUDA (otherwise only our number is printed). The last
line is a JSON record for docs/benchmarks.md.
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

from masa_jax.models import qwen
from masa_jax.models.qwen.params import params_from_state_dict

PRESETS = {
    # A small shape whose both sides fit a laptop CPU.
    "cpu": dict(hf=dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
                dtype="float32", batch=8, seq=256),
    # Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B), random weights.
    "gpu": dict(hf=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                        max_position_embeddings=40960),
                dtype="bfloat16", batch=8, seq=1024),
}


def median_seconds(calls: dict, rounds: int) -> dict:
    """Median seconds per call of each blocking callable, timed in alternating rounds so that load from
    other processes on a shared machine hits both sides alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def ours_call(cfg: qwen.ModelConfig, params, tokens: np.ndarray, warmup: int):
    """A blocking jitted forward after `warmup` calls (compiles), and its logits."""
    fwd = jax.jit(qwen.forward, static_argnums=0)
    tok, mask = jnp.asarray(tokens), jnp.ones(tokens.shape, bool)
    call = lambda: fwd(cfg, params, tok, mask).block_until_ready()
    for _ in range(warmup):
        logits = call()
    return call, logits


def torch_call(model, tokens: np.ndarray, device: str):
    """A blocking transformers forward after one warm-up call, and its logits."""
    import torch

    tok = torch.tensor(tokens, dtype=torch.long, device=device)
    mask = torch.ones_like(tok)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        with torch.inference_mode():
            out = model(input_ids=tok, attention_mask=mask).logits
        sync()
        return out

    return call, call()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int, help="override the preset's layer count (quick checks)")
    ap.add_argument("--iters", type=int, default=10, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    ap.add_argument("--no-torch", action="store_true", help="time only masa_jax")
    args = ap.parse_args(argv)

    preset = PRESETS[args.device]
    hf_kw = dict(preset["hf"])
    if args.layers:
        hf_kw["num_hidden_layers"] = args.layers
    B, T, dtype = args.batch or preset["batch"], args.seq or preset["seq"], preset["dtype"]
    platform_name = jax.devices()[0].platform
    if args.device == "gpu" and platform_name != "gpu":
        print(f"warning: --device gpu but jax runs on {platform_name}")
    tokens = np.random.RandomState(0).randint(0, hf_kw["vocab_size"], (B, T)).astype(np.int32)

    torch_device = None
    if not args.no_torch:
        import torch
        torch_device = "cuda" if args.device == "gpu" else "cpu"
        if torch_device == "cuda" and not torch.cuda.is_available():
            print("torch has no CUDA here: timing masa_jax only")
            torch_device = None

    from transformers import Qwen3Config
    hf_config = Qwen3Config(**hf_kw)
    hf_dict = {**hf_config.to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    cfg = qwen.ModelConfig.from_hf_dict(hf_dict, param_dtype=dtype, dtype=dtype, attention_impl=args.attention)

    model = None
    if torch_device is not None:
        import torch
        from transformers import Qwen3ForCausalLM
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(hf_config).to(getattr(torch, dtype)).to(torch_device).eval()
        # The same weights on both sides, mapped by the HF-name table the checkpoint loader uses.
        state = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
        host = params_from_state_dict(cfg.replace(param_dtype="float32"), state)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), host)
        del state, host
    else:
        params = jax.jit(qwen.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))

    calls = {}
    calls["masa_jax"], ours_logits = ours_call(cfg, params, tokens, args.warmup)
    if model is not None:
        calls["transformers"], torch_logits = torch_call(model, tokens, torch_device)
    secs = median_seconds(calls, args.iters)
    record = {
        "benchmark": "forward", "device": args.device, "jax_platform": platform_name,
        "jax_device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "shape": {**hf_kw, "batch": B, "seq": T},
        "dtype": dtype, "attention": args.attention, "rounds": args.iters,
    }
    for name, s in secs.items():
        record.update({f"{name}_s": s, f"{name}_tokens_per_s": B * T / s})
        print(f"{name:13s} {B}x{T} {dtype}: {s * 1e3:9.1f} ms/forward  {B * T / s:12.0f} tokens/s (median)")
    if model is not None:
        diff = float(np.abs(np.asarray(ours_logits, np.float32) - torch_logits.float().cpu().numpy()).max())
        ratio = secs["transformers"] / secs["masa_jax"]
        record.update(speedup=ratio, max_abs_logit_diff=diff)
        print(f"ratio (masa_jax / transformers tokens/s): {ratio:.2f}x   max |dlogit| {diff:.2e}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
