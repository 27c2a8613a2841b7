"""Throughput and model FLOPs utilisation (MFU) of an RL step.

Model FLOPs count what the model needs, not what the hardware ran (remat recomputation, padding and
the sampler's unused slots are left out), for a sequence of T tokens:

    forward(T) = 2 N T + 2 L h d T (T + 1)

N is the matmul parameter count: every layer's projections and the LM head, which is a matmul even
when tied to the embedding (MaxText counts it too); the input embedding is a lookup and costs nothing.
The second term is causal attention: query i meets i keys, 2 h d FLOPs each for the scores and for
the values (L layers, h query heads of size d).

- Update: each training sequence (prompt + response) takes one forward for the old log-probs, then per
  PPO epoch a forward and backward (3 forwards) plus a reference forward when kl_coef > 0.
- Rollouts: 2 N per generated token (prompt prefill and attention over the KV cache are left out, so
  this is a lower bound).
- MFU = (rollout + update FLOPs) / (step time x devices x peak FLOP/s per device). BC steps are not
  counted. The peak is the dense bf16 figure of `jax.devices()[0].device_kind` from `PEAK_BF16_FLOPS`
  or `config.log.peak_flops_per_device`; for a device in neither, MFU is not logged (never guessed).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Dense bf16 FLOP/s per JAX device, from the vendors' data sheets. TPU v2 / v3 devices are single
# cores (half a chip); from v4 on a device is a chip.
PEAK_BF16_FLOPS: Mapping[str, float] = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA L4": 121e12,
}


def matmul_params(cfg) -> int:
    """N: the parameters a token multiplies through (per-layer projections and the LM head)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * layer + cfg.vocab_size * cfg.hidden_size


def forward_flops(cfg, lengths: Sequence[int] | np.ndarray) -> float:
    """Forward FLOPs of sequences of the given lengths (module docstring)."""
    t = np.asarray(lengths, np.float64)
    attn = 2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float(np.sum(t * (t + 1)))
    return 2.0 * matmul_params(cfg) * float(t.sum()) + attn


def update_counts(cfg, lengths: Sequence[int], *, ppo_epochs: int, reference: bool) -> dict[str, float]:
    """This process's update work: `tokens/update` (sequence tokens x passes: the old-log-prob forward
    and one per epoch) and `flops/update` (both summed over hosts)."""
    tokens = float(np.sum(lengths)) if len(lengths) else 0.0
    forwards = 1 + ppo_epochs * (3 + int(reference))
    return {"tokens/update": tokens * (1 + ppo_epochs), "flops/update": forward_flops(cfg, lengths) * forwards}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """`override` when > 0, else the table's figure for `device_kind`; None when unknown."""
    return float(override) if override > 0 else PEAK_BF16_FLOPS.get(device_kind)


_warned: set[str] = set()


def step_metrics(cfg, metrics: Mapping[str, float], step_s: float, *, peak_override: float = 0.0
                 ) -> dict[str, float]:
    """perf/rollout_tokens_per_s, perf/update_tokens_per_s and perf/mfu from a step's host-combined
    metrics (tokens/solution, tokens/meta, tokens/update, flops/update, time/rollout_s, time/update_s)."""
    import jax

    out = {}
    generated = metrics.get("tokens/solution", 0.0) + metrics.get("tokens/meta", 0.0)
    if metrics.get("time/rollout_s"):
        out["perf/rollout_tokens_per_s"] = generated / metrics["time/rollout_s"]
    if metrics.get("time/update_s"):
        out["perf/update_tokens_per_s"] = metrics.get("tokens/update", 0.0) / metrics["time/update_s"]
    kind = jax.devices()[0].device_kind
    peak = peak_flops_per_device(kind, peak_override)
    if peak is None:
        if kind not in _warned:
            _warned.add(kind)
            log.info("perf/mfu not logged: no peak FLOP/s known for device kind %r (set "
                     "config.log.peak_flops_per_device)", kind)
    elif step_s > 0:
        flops = 2.0 * matmul_params(cfg) * generated + metrics.get("flops/update", 0.0)
        out["perf/mfu"] = flops / (step_s * jax.device_count() * peak)
    return out
