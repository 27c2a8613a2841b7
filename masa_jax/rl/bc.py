"""Behaviour cloning on expert meta-trajectories (docs/method.md §4, MASA-efficient).

The BC step is the RL step's machinery (`train_step.make_update_step`) with the cross-entropy loss and
its own constant learning rate (`BCConfig.lr`) on the same optimizer state; it does not
advance `TrainState.step`. Batch: tokens, attention_mask, loss_mask as in `train_step`'s layout, with
the loss mask on the rewritten meta output only (prompt and padding masked).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.logprobs import token_logprobs
from masa_jax.parallel import multihost
from masa_jax.rl import expert_buffer as expert_lib
from masa_jax.rl import grpo
from masa_jax.rl.train_step import OptimConfig, make_update_step


@dataclasses.dataclass(frozen=True)
class BCConfig:
    """Behaviour cloning of the best meta-trajectories (paper: N_expert 128, E_bc 5): the run config's
    `bc` section, field for field."""

    enabled: bool = True            # only where the meta path runs (masa, masa_efficient)
    buffer_size: int = 128          # N_expert: trajectories (over all hosts) collected before the BC steps
    steps: int = 5                  # E_bc: BC steps on a full buffer
    lr: float = 1e-6                # constant, on the RL optimizer's state (see make_bc_step)
    min_notion_reward: float = 0.2  # an expert's notion reward must reach this (select_experts)


def bc_loss(logp: jax.Array, mask: jax.Array, *, num_tokens: jax.Array | None = None):
    """Mean token cross-entropy: -sum(logp * mask) / num_tokens; returns (loss, metrics).

    logp: float [N, T] log-probs of the target tokens; mask: bool [N, T] (output tokens only).
    `num_tokens` defaults to the mask's count; pass the whole batch's count for a micro-batch.
    Metrics: bc_loss (the same value, for logging).
    """
    maskf = jnp.asarray(mask).astype(logp.dtype)
    if num_tokens is None:
        num_tokens, _ = grpo.batch_counts(maskf)
    loss = -jnp.sum(logp * maskf) / num_tokens
    return loss, {"bc_loss": jax.lax.stop_gradient(loss)}


def bc_microbatch_loss(model_cfg: ModelConfig, chunk_size: int, params, ref_params, mb, num_tokens,
                       num_seqs):
    """`bc_loss` of one micro-batch at temperature 1 (the loss_fn of `make_update_step`)."""
    del ref_params, num_seqs
    logp = token_logprobs(model_cfg, params, mb["tokens"], mb["attention_mask"], chunk_size=chunk_size)
    return bc_loss(logp, mb["loss_mask"], num_tokens=num_tokens)


def make_bc_step(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: jax.sharding.Mesh,
                 micro_batch_size: int, *, lr: float, keep_reference: bool = False, chunk_size: int = 512,
                 lora_cfg=None):
    """Jitted `(state, batch) -> (state, metrics)`: one AdamW step on `bc_loss` at the constant
    learning rate `lr` (`BCConfig.lr`) with `optim_cfg`'s clipping / Adam / weight decay, micro-batched like
    the RL step. `keep_reference` must match the state
    (`LossConfig.keep_reference`); the reference params pass through unchanged. `lora_cfg`: the state
    trains LoRA adapters (`make_update_step`).
    """
    lr = jnp.float32(lr)
    return make_update_step(model_cfg, optim_cfg, mesh, micro_batch_size,
                            functools.partial(bc_microbatch_loss, model_cfg, chunk_size),
                            lr_fn=lambda step: lr, advance_step=False, keep_reference=keep_reference,
                            lora_cfg=lora_cfg)


def clone_experts(state, ro, buffer: expert_lib.ExpertBuffer, bc_update: Callable, codec, *, k: int,
                  min_notion_reward: float):
    """Algorithm 1's behaviour-cloning lines: the step's expert meta-trajectories (`select_experts` on
    the rollouts `ro`) go into the buffer; once the buffer holds N_expert over all hosts, the BC steps
    run on them (`bc_update(state, experts, codec)`) and the buffer is emptied. Returns (state, metrics)."""
    experts = expert_lib.select_experts(
        ro.meta_texts, ro.preds, np.nan_to_num(ro.meta_rewards["notion"], nan=-1.0), ro.correct, ro.lengths,
        ro.meta_prompt_ids, [p.uid for p in ro.problems], ro.rolled_out, k=k, min_notion_reward=min_notion_reward)
    buffer.add(experts)
    metrics = {"bc/new_experts": float(len(experts)), "bc/buffer_size": float(len(buffer.items))}
    # N_expert counts trajectories over all hosts; every host must take the (collective) BC step.
    if sum(multihost.allgather_json(len(buffer.items))) >= buffer.capacity:
        t0 = time.perf_counter()
        state, bc_metrics = bc_update(state, buffer.drain(), codec)
        metrics.update(bc_metrics)
        metrics["time/bc_s"] = time.perf_counter() - t0
    return state, metrics

