"""Host side of the updates: rollouts / experts -> padded global batches -> the jitted steps.

Each JAX process packs its own sequences; `to_global` assembles the per-process blocks into one batch
sharded over the mesh (all processes agree on the padded shape first), so the same code runs on one
CPU and on a pod.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.rl import batching, bc, train_step
from masa_jax.rl.expert_buffer import Expert


def loss_config(config) -> train_step.LossConfig:
    r = config.rl
    return train_step.LossConfig(clip_low=r.clip_low, clip_high=r.clip_high, clip_c=r.clip_c, agg=r.loss_agg,
                                 kl_coef=r.kl_coef, kl_estimator=r.kl_estimator,
                                 temperature=config.rollout.temperature, chunk_size=r.chunk_size)


def optim_config(config) -> train_step.OptimConfig:
    r = config.rl
    return train_step.OptimConfig(learning_rate=r.lr, warmup_steps=r.warmup_steps, weight_decay=r.weight_decay,
                                  clip_norm=r.clip_norm, bc_learning_rate=config.bc.lr)


def _host_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class Updater:
    """The jitted RL step, BC step and old-log-prob pass of one run, plus the initial train state."""
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    pad_id: int
    micro_batch_size: int
    updates_per_step: int
    bc_steps: int
    buckets: tuple[int, ...]
    train_step: object
    bc_step: object
    compute_logprobs: object
    state: train_step.TrainState | None

    @classmethod
    def create(cls, config, model_cfg: ModelConfig, params, mesh: jax.sharding.Mesh, *, pad_id: int) -> "Updater":
        lcfg, ocfg = loss_config(config), optim_config(config)
        mb = config.rl.micro_batch_size
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if mb % dp:
            raise ValueError(f"rl.micro_batch_size={mb} must be a multiple of the data-parallel size {dp}")
        state = train_step.create_train_state(model_cfg, params, ocfg, mesh, keep_reference=lcfg.keep_reference)
        max_len = config.data.max_prompt_length + max(config.rollout.max_response_length,
                                                      config.rollout.meta_max_new_tokens)
        return cls(
            model_cfg=model_cfg, mesh=mesh, pad_id=pad_id, micro_batch_size=mb,
            updates_per_step=config.rl.updates_per_step, bc_steps=config.bc.steps,
            buckets=batching.default_buckets(max_len),
            train_step=train_step.make_train_step(model_cfg, lcfg, ocfg, mesh, mb),
            bc_step=bc.make_bc_step(model_cfg, ocfg, mesh, mb, keep_reference=lcfg.keep_reference,
                                    chunk_size=config.rl.chunk_size),
            compute_logprobs=train_step.make_compute_logprobs(model_cfg, mesh, mb,
                                                              temperature=lcfg.temperature,
                                                              chunk_size=lcfg.chunk_size),
            state=state)

    # ------------------------------------------------------------------------------------ batches
    def pack(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], **kw) -> dict:
        """This process's padded numpy batch (rows a multiple of the micro-batch size)."""
        return batching.pack_sequences(prompt_ids, response_ids, pad_id=self.pad_id,
                                       row_multiple=self.micro_batch_size, buckets=self.buckets, **kw)

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global batch from every process's local block, sharded over (data, fsdp)."""
        sharding = train_step.batch_sharding(self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        n, t = local["tokens"].shape
        n_max, t_max = np.max(multihost_utils.process_allgather(np.array([n, t])), axis=0)
        local = {k: _pad_to(v, int(n_max), int(t_max)) for k, v in local.items()}
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

    # ------------------------------------------------------------------------------------ updates
    def policy_update(self, state: train_step.TrainState, ro) -> tuple[train_step.TrainState, dict]:
        """Old log-probs with the current params, then `updates_per_step` clipped-surrogate updates on
        the step's solution and meta rollouts."""
        n_local = len(ro.train_response_ids)
        n_any = n_local if jax.process_count() == 1 else int(
            np.sum(multihost_utils.process_allgather(np.array(n_local))))
        if n_any == 0:  # every problem gated: nothing to learn from this step
            return state, {"actor/empty_batch": 1.0}
        local = self.pack(ro.train_prompt_ids, ro.train_response_ids, advantages=ro.train_advantages,
                          sampler_logprobs=ro.train_sampler_logprobs)
        batch = self.to_global(local)
        old_logprobs, lp_metrics = self.compute_logprobs(state.params, batch)
        batch = {k: v for k, v in batch.items() if k != "sampler_logprobs"}
        batch["old_logprobs"] = old_logprobs
        metrics = _host_metrics(lp_metrics, "actor/")
        for _ in range(self.updates_per_step):
            state, m = self.train_step(state, batch)
        metrics.update(_host_metrics(m, "actor/"))
        metrics["actor/batch_rows"] = float(local["tokens"].shape[0])
        metrics["actor/batch_len"] = float(local["tokens"].shape[1])
        return state, metrics

    def bc_update(self, state: train_step.TrainState, experts: Sequence[Expert], codec) -> tuple[
            train_step.TrainState, dict]:
        """`bc_steps` behaviour-cloning steps on the expert meta-trajectories (prompt masked); the
        rewritten output ends with the chat end-of-turn token, so BC also teaches where to stop."""
        responses = [codec.encode(e.output) + [codec.end_of_turn] for e in experts]
        batch = self.to_global(self.pack([e.prompt_ids for e in experts], responses))
        first = last = None
        for _ in range(self.bc_steps):
            state, m = self.bc_step(state, batch)
            last = _host_metrics(m, "bc/")
            first = first or last
        metrics = {"bc/experts": float(len(experts)), "bc/loss_first": first["bc/loss"],
                   "bc/loss_last": last["bc/loss"], "bc/skipped": last["bc/skipped"]}
        return state, metrics


def _pad_to(x: np.ndarray, n: int, t: int) -> np.ndarray:
    pad = [(0, n - x.shape[0])] + ([(0, t - x.shape[1])] if x.ndim > 1 else [])
    return np.pad(x, pad)
