"""GRPO pieces as pure functions: group-relative advantages, the clipped policy loss, the KL penalty, and
the registries that make DAPO / Dr. GRPO style variants config choices rather than forks.

Method doc section 3. Shapes: P problems, G rollouts per group, N sequences, T tokens.

Micro-batch exactness: every loss and metric here that is a mean takes its normaliser (`num_tokens`,
`num_seqs`) as an argument, defaulting to the counts of the given mask. The train step passes the counts
of the WHOLE batch, so the per-micro-batch values sum to the full-batch value. Metric keys ending in
`_max` / `_min` combine by max / min instead of sum.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------------------- advantages


def _group_stats(rewards: jax.Array, mask: jax.Array | None):
    """Masked count, mean, unbiased (ddof=1) std and a 'no signal' flag per row of [P, G] rewards."""
    r = jnp.asarray(rewards, jnp.float32)
    m = jnp.ones(r.shape, bool) if mask is None else jnp.asarray(mask, bool)
    n = jnp.sum(m, axis=-1, keepdims=True)
    mean = jnp.sum(jnp.where(m, r, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(m, (r - mean) ** 2, 0.0), axis=-1, keepdims=True) / jnp.maximum(n - 1, 1)
    hi = jnp.max(jnp.where(m, r, -jnp.inf), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(m, r, jnp.inf), axis=-1, keepdims=True)
    # Equal rewards must give exactly 0: (r - mean) can be an ulp off for non-dyadic rewards such as
    # 1/3, and dividing that by (0 + eps) would leave a spurious non-zero advantage.
    flat = (n <= 1) | (hi == lo)
    return r, m, n, mean, jnp.sqrt(var), flat


def group_advantages(rewards: jax.Array, eps: float = 1e-6, mask: jax.Array | None = None) -> jax.Array:
    """GRPO advantages: A = (r - mean(group)) / (std(group) + eps), one group per row.

    rewards: float [P, G]; mask: optional bool [P, G] marking the rollouts that exist (ragged groups:
    a gated problem has an all-False row). The std uses Bessel's correction (ddof=1, as the authors'
    verl code). Rows whose present rewards are all equal, rows with at most one rollout, and masked-out
    entries get exactly 0. Returns float32 [P, G].
    """
    r, m, _, mean, std, flat = _group_stats(rewards, mask)
    return jnp.where(m & ~flat, (r - mean) / (std + eps), 0.0)


def group_mean_advantages(rewards: jax.Array, eps: float = 1e-6, mask: jax.Array | None = None) -> jax.Array:
    """Dr. GRPO advantages: A = r - mean(group), no std normalisation (which up-weights groups that are
    nearly all right or all wrong). Same shapes and masking as `group_advantages`; `eps` is unused by
    the formula and accepted so all estimators share one signature."""
    del eps
    r, m, _, mean, _, flat = _group_stats(rewards, mask)
    return jnp.where(m & ~flat, r - mean, 0.0)


def rloo_advantages(rewards: jax.Array, eps: float = 1e-6, mask: jax.Array | None = None) -> jax.Array:
    """RLOO advantages: A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean). Same shapes and
    masking as `group_advantages`; `eps` is unused (shared signature)."""
    del eps
    r, m, n, mean, _, flat = _group_stats(rewards, mask)
    scale = n / jnp.maximum(n - 1, 1)
    return jnp.where(m & ~flat, scale * (r - mean), 0.0)


# name -> fn(rewards [P, G], eps, mask [P, G] | None) -> advantages [P, G]
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {
    "grpo": group_advantages,
    "dr_grpo": group_mean_advantages,
    "rloo": rloo_advantages,
}


def get_advantage_estimator(name: str) -> Callable[..., jax.Array]:
    """The advantage estimator registered under `name` (see ADVANTAGE_ESTIMATORS)."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}") from None


# ------------------------------------------------------------------------------------- aggregation


def batch_counts(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(num_tokens, num_seqs) of a bool [N, T] loss mask as float32 scalars, each at least 1.

    A sequence counts only if it has at least one loss token, so all-False padding rows (added to fill
    a micro-batch) change neither normaliser.
    """
    m = jnp.asarray(mask, jnp.float32)
    num_tokens = jnp.maximum(jnp.sum(m), 1.0)
    num_seqs = jnp.maximum(jnp.sum(jnp.any(m > 0, axis=-1).astype(jnp.float32)), 1.0)
    return num_tokens, num_seqs


def _token_mean(loss_mat, mask, num_tokens, num_seqs):
    del num_seqs
    return jnp.sum(loss_mat * mask) / num_tokens


def _seq_mean_token_mean(loss_mat, mask, num_tokens, num_seqs):
    del num_tokens
    per_seq = jnp.sum(loss_mat * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.sum(per_seq) / num_seqs


def _seq_mean_token_sum(loss_mat, mask, num_tokens, num_seqs):
    del num_tokens
    return jnp.sum(loss_mat * mask) / num_seqs


# verl's names. name -> fn(loss_mat [N, T], mask float [N, T], num_tokens, num_seqs) -> scalar
LOSS_AGGREGATIONS: dict[str, Callable[..., jax.Array]] = {
    "token-mean": _token_mean,                    # DAPO / verl default
    "seq-mean-token-mean": _seq_mean_token_mean,  # the GRPO paper's formula
    "seq-mean-token-sum": _seq_mean_token_sum,
}


def aggregate_loss(loss_mat: jax.Array, mask: jax.Array, agg: str = "token-mean", *,
                   num_tokens: jax.Array | None = None, num_seqs: jax.Array | None = None) -> jax.Array:
    """Reduces a per-token loss [N, T] over the bool/float mask [N, T] with the named aggregation.

    token-mean: sum / num_tokens. seq-mean-token-mean: per sequence the mean over its tokens, summed
    and divided by num_seqs. seq-mean-token-sum: per sequence the sum, summed and divided by num_seqs.
    The normalisers default to `batch_counts(mask)`; pass the whole batch's counts when `loss_mat` is
    one micro-batch of it.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {sorted(LOSS_AGGREGATIONS)}")
    mask = jnp.asarray(mask).astype(loss_mat.dtype)
    nt, ns = batch_counts(mask)
    num_tokens = nt if num_tokens is None else num_tokens
    num_seqs = ns if num_seqs is None else num_seqs
    return LOSS_AGGREGATIONS[agg](loss_mat, mask, num_tokens, num_seqs)


# ------------------------------------------------------------------------------------- policy loss

# exp(20) ~ 5e8: far outside any clip range, and keeps exp() finite when the policies diverge (verl).
_MAX_LOG_RATIO = 20.0


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float | None = 10.0,
                agg: str = "token-mean", *, num_tokens: jax.Array | None = None,
                num_seqs: jax.Array | None = None, entropy: jax.Array | None = None):
    """PPO clipped surrogate with clip-higher and dual clip; returns (loss, metrics).

    logp, old_logp: float [N, T] log-probs of the taken tokens under the current / old policy;
    advantages: float [N] (one per sequence) or [N, T]; mask: bool [N, T] (response tokens).
    Per token, with ratio = exp(logp - old_logp) (log-ratio clamped to +-20):
        l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        l = min(l, -A * clip_c)   where A < 0   (dual clip; clip_c=None disables it)
    then aggregated with `agg` (see `aggregate_loss`). `entropy` [N, T], when given, is reported as a
    metric only.

    Metrics (token means over the mask, normalised by `num_tokens`): clip_fraction_low (A < 0 and
    ratio < 1 - clip_low), clip_fraction_high (A > 0 and ratio > 1 + clip_high), clip_fraction (low +
    high: the tokens where the clipped branch was taken, verl's pg_clipfrac), clip_fraction_dual (A < 0
    and ratio > clip_c: the dual clip is active, verl's pg_clipfrac_lower), approx_kl (k3 estimate of
    KL(old || new)), ppo_kl (k1, mean of old_logp - logp, verl's name), ratio_mean, ratio_max,
    ratio_min, entropy. On-policy (old_logp = logp) every clip fraction and ppo_kl is 0 and the loss is
    REINFORCE with the group baseline; they move once an earlier PPO mini-batch update has changed the
    params.
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1, got {clip_c}")
    maskf = jnp.asarray(mask).astype(logp.dtype)
    nt, ns = batch_counts(maskf)
    num_tokens = nt if num_tokens is None else num_tokens
    num_seqs = ns if num_seqs is None else num_seqs
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    adv = jnp.broadcast_to(adv.astype(logp.dtype), logp.shape)

    log_ratio = jnp.clip(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    if clip_c is not None:
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -adv * clip_c), per_token)
    loss = aggregate_loss(per_token, maskf, agg, num_tokens=num_tokens, num_seqs=num_seqs)

    ratio_sg = jax.lax.stop_gradient(ratio)
    log_ratio_sg = jax.lax.stop_gradient(log_ratio)
    tmean = lambda x: jnp.sum(x * maskf) / num_tokens
    low = (adv < 0) & (ratio_sg < 1.0 - clip_low)
    high = (adv > 0) & (ratio_sg > 1.0 + clip_high)
    metrics = {
        "pg_loss": jax.lax.stop_gradient(loss),
        "clip_fraction_low": tmean(low),
        "clip_fraction_high": tmean(high),
        "clip_fraction": tmean(low | high),
        "clip_fraction_dual": tmean((adv < 0) & (ratio_sg > clip_c)) if clip_c is not None else jnp.zeros(()),
        "approx_kl": tmean(ratio_sg - 1.0 - log_ratio_sg),
        "ppo_kl": tmean(-log_ratio_sg),
        "ratio_mean": tmean(ratio_sg),
        "ratio_max": jnp.max(jnp.where(maskf > 0, ratio_sg, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(maskf > 0, ratio_sg, jnp.inf)),
    }
    if entropy is not None:
        metrics["entropy"] = tmean(jax.lax.stop_gradient(entropy))
    return loss, metrics


# -------------------------------------------------------------------------------------- KL penalty


def _kl_k1(logp, ref_logp):
    return logp - ref_logp


def _kl_k3(logp, ref_logp):
    # Schulman's low-variance estimator of KL(pi || ref) from samples of pi: r - 1 - log r with
    # r = ref / pi; non-negative, unbiased. Clamped to [-10, 10] as verl's low_var_kl.
    log_r = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.clip(jnp.exp(log_r) - 1.0 - log_r, -10.0, 10.0)


# name -> fn(logp [N, T], ref_logp [N, T]) -> per-token KL estimate [N, T]
KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": _kl_k1,
    "k3": _kl_k3,
    "low_var_kl": _kl_k3,
    "low-var-kl": _kl_k3,
}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "low_var_kl") -> jax.Array:
    """Per-token estimate [N, T] of KL(pi_theta || pi_ref) from the sampled tokens' log-probs [N, T].

    `k1`: logp - ref_logp (unbiased, high variance, can be negative); `k3` = `low_var_kl`:
    exp(ref - logp) - 1 - (ref - logp), clamped to [-10, 10] (verl). Aggregate it with `aggregate_loss`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)
