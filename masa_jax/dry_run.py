"""The rough formula of `--dry_run`: per-device memory of a config on its mesh, from shapes alone.

Params are built abstractly (`jax.eval_shape`), sharded by the rules table onto an AbstractMesh of the
configured shape (so an 8B pod config can be checked on a laptop), and the per-device bytes of params,
optimizer state, the sampler's KV cache and the train step's activations are estimated at the
trainer's largest length buckets. With LoRA (config.lora.rank > 0) the base is frozen: gradients and
AdamW moments cover only the adapters. It is ROUGH: it counts arguments well but not XLA's temporaries
(measured 3-6x more than its activation term: docs/benchmarks.md), and it assumes the sampler runs on
the whole mesh. `masa_jax.compile_check` asks XLA instead (`config.mesh.topology`, the [tpu] extra);
`--dry_run` prints both when it can.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from masa_jax.components import lora_config
from masa_jax.models.qwen import lora as lora_lib, quantize
from masa_jax.models.qwen import model as qwen_model
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.presets import model_config_for
from masa_jax.parallel.mesh import MESH_AXES
from masa_jax.parallel.rules import SAMPLING_RULES, TRAIN_RULES, logical_to_spec

GiB = 1024 ** 3


def _mesh_shape(config, num_devices: int | None) -> tuple[int, ...]:
    shape = list(config.mesh.shape)
    if -1 in shape:
        if num_devices is None:
            raise ValueError("mesh.shape has -1: pass the device count (--dry_run_devices)")
        shape[shape.index(-1)] = num_devices // int(np.prod([s for s in shape if s != -1]))
    return tuple(int(s) for s in shape)


def _per_device_bytes(shapes, axes, mesh, rules) -> int:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    total = 0
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_axes)):
        spec = logical_to_spec(a, rules, mesh, s.shape)
        shards = 1
        for entry in spec:
            for ax in ((entry,) if isinstance(entry, str) else (entry or ())):
                shards *= sizes[ax]
        total += math.prod(s.shape) * jax.dtypes.itemsize_bits(s.dtype) // 8 // shards  # int4: half a byte
    return total


def estimate(config, num_devices: int | None = None) -> dict:
    """Per-device memory estimate (bytes) of the run described by `config`."""
    cfg = model_config_for(config)
    shape = _mesh_shape(config, num_devices)
    mesh = jax.sharding.AbstractMesh(shape, MESH_AXES)
    sizes = dict(zip(MESH_AXES, shape))
    shapes = jax.eval_shape(lambda k: qwen_model.init_params(cfg, k), jax.random.key(0))
    axes = qwen_model.param_logical_axes(cfg)
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    params_b = _per_device_bytes(shapes, axes, mesh, TRAIN_RULES)
    lcfg = lora_config(config)
    if lcfg is None:
        trainable_shapes, trainable_axes, adapters_b, n_adapter = shapes, axes, 0, 0
    else:  # the adapters (float32) train; the base sits frozen in the param dtype, or quantized (QLoRA)
        if lcfg.base_quantization:
            q = lcfg.base_quantization
            params_b = _per_device_bytes(quantize.quantized_shapes(cfg, q), quantize.quantized_logical_axes(cfg, q),
                                         mesh, TRAIN_RULES)
        trainable_shapes = lora_lib.adapter_shapes(cfg, lcfg)
        trainable_axes = lora_lib.adapter_logical_axes(cfg, lcfg)
        adapters_b = _per_device_bytes(trainable_shapes, trainable_axes, mesh, TRAIN_RULES)
        n_adapter = lora_lib.num_adapter_params(cfg, lcfg)
    f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), trainable_shapes)
    opt_b = 2 * _per_device_bytes(f32, trainable_axes, mesh, TRAIN_RULES)  # AdamW: two float32 moments
    compute = np.dtype(cfg.dtype).itemsize
    if lcfg is not None and lcfg.base_quantization:  # the sampler keeps the base quantized, adapters unmerged
        q = lcfg.base_quantization
        qshapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.dtype) if s.dtype == cfg.jnp_param_dtype
                               else s, quantize.quantized_shapes(cfg, q))
        sampling_params_b = (_per_device_bytes(qshapes, quantize.quantized_logical_axes(cfg, q), mesh, SAMPLING_RULES)
                             + _per_device_bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.dtype),
                                                              trainable_shapes), trainable_axes, mesh, SAMPLING_RULES))
    else:
        sampling_params_b = _per_device_bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.dtype), shapes),
                                              axes, mesh, SAMPLING_RULES)
    # The trainer's largest shapes: the sampler's largest cache bucket, the updater's largest length bucket.
    from masa_jax.compile_check import step_shapes
    shp = step_shapes(config)
    # KV cache: slots are spread over data x fsdp, kv-heads over tensor (when they divide).
    T = shp.cache_len
    slots_per_dev = math.ceil(config.rollout.num_slots / (sizes["data"] * sizes["fsdp"]))
    kv_shards = sizes["tensor"] if cfg.num_kv_heads % sizes["tensor"] == 0 else 1
    kv_b = 2 * cfg.num_layers * slots_per_dev * T * (cfg.num_kv_heads // kv_shards) * cfg.head_dim * compute
    # Train step, per micro-batch and device: with full remat the scan saves one [mb, T, D] per layer,
    # one layer's working set is live at a time, and one logits chunk [mb, C, V] in float32.
    mb = max(1, math.ceil(config.rl.micro_batch_size / (sizes["data"] * sizes["fsdp"])))
    T = shp.seq_len
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    saved = cfg.num_layers * mb * T * D * compute
    layer_ws = mb * T * (4 * D + 3 * F // sizes["tensor"] + 2 * cfg.num_heads * cfg.head_dim // sizes["tensor"]) * compute
    logits_chunk = mb * config.rl.chunk_size * V * 4 * 2 // sizes["tensor"]
    # XLA attention materialises one layer's float32 scores [mb, H, T, T] and their bf16 probabilities;
    # the Pallas (splash) kernel works in blocks.
    scores = 0 if cfg.attention_impl == "pallas" else mb * max(1, cfg.num_heads // sizes["tensor"]) * T * T * 6
    act_b = saved + layer_ws + logits_chunk + scores
    if lcfg is None:
        # Gradients: float32; with more than one micro-batch the scan also holds a float32 accumulator.
        grads_b = params_b if cfg.param_dtype == "float32" else 2 * params_b
    else:
        grads_b = adapters_b
    if shp.minibatch_rows > config.rl.micro_batch_size:
        grads_b *= 2
    params_b += adapters_b  # frozen base + trainable adapters (0 without LoRA)
    return dict(model=cfg, mesh=dict(zip(MESH_AXES, shape)), num_devices=int(np.prod(shape)), num_params=n_params,
                lora=lcfg, num_adapter_params=n_adapter, lora_adapters=adapters_b,
                params=params_b, grads=grads_b, optimizer=opt_b, sampling_params=sampling_params_b, kv_cache=kv_b,
                activations=act_b, train_total=params_b + grads_b + opt_b + act_b,
                rollout_total=params_b + opt_b + sampling_params_b + kv_b)


def report(config, num_devices: int | None = None, device_memory_gib: float | None = None) -> str:
    e = estimate(config, num_devices)
    cfg = e["model"]
    lines = [f"model: {cfg.family} {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}: "
             f"{e['num_params'] / 1e9:.2f} B params",
             f"mesh: {e['mesh']} ({e['num_devices']} devices)"]
    if e["lora"] is not None:
        lc = e["lora"]
        lines.append(f"LoRA rank {lc.rank}, alpha {lc.alpha:g} on {','.join(lc.targets)}: "
                     f"{e['num_adapter_params'] / 1e6:.2f} M trainable adapter params "
                     f"({100 * e['num_adapter_params'] / e['num_params']:.3f} % of the base, which is frozen); "
                     "grads and optimizer below are the adapters'")
        if lc.base_quantization:
            lines.append(f"frozen base: {lc.base_quantization} projection weights (qwix; embeddings and norms in "
                         f"{cfg.param_dtype}); the sampler reads it quantized, adapters unmerged")
    lines.append("per-device memory, rough formula (XLA's temporaries not counted):")
    keys = ("params", "grads", "optimizer", "activations", "train_total", "sampling_params", "kv_cache",
            "rollout_total")
    if e["lora"] is not None:
        keys = ("lora_adapters",) + keys
    for key in keys:
        lines.append(f"  {key:<16} {e[key] / GiB:8.2f} GiB")
    if device_memory_gib:
        peak = max(e["train_total"], e["rollout_total"]) / GiB
        verdict = "fits" if peak <= 0.9 * device_memory_gib else "DOES NOT FIT"
        lines.append(f"formula peak {peak:.2f} GiB of {device_memory_gib:g} GiB per device: {verdict} (rough)")
    return "\n".join(lines)
