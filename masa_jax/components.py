"""Each component's frozen config, built from the run config in this one place: the rollout, the loss
and the optimiser, the updates, the verifier pool and the sampler. The trainer, `evaluate` and the experiments call
these, so a component runs the same way everywhere; its defaults live with the component.
"""
from __future__ import annotations

from typing import Sequence

from masa_jax import config as config_lib
from masa_jax.models.qwen.lora import LoraConfig
from masa_jax.rewards.math import VerifierConfig
from masa_jax.rl.controls import ControlConfig
from masa_jax.rl import rollout_engine
from masa_jax.rl.rollout import RolloutConfig
from masa_jax.rl.train_step import LossConfig, OptimConfig
from masa_jax.rl.update import UpdaterConfig
from masa_jax.sampling.generate import SamplerConfig


def rollout_config(config) -> RolloutConfig:
    """One step's rollouts: both paths, the meta reward, the advantages, MASA-efficient's controls."""
    e = config.efficient
    return RolloutConfig(
        num_meta=config.rollout.num_meta, num_solutions=config.rollout.num_solutions,
        max_response_length=config.rollout.max_response_length,
        meta_max_new_tokens=config.rollout.meta_max_new_tokens, use_meta=config_lib.uses_meta(config),
        k=config.meta.k, base=config.meta.base, weights=tuple(config.meta.weights),
        min_solution_length=config.prompts.min_solution_length, meta_template=config.prompts.meta_template,
        solution_template=config.prompts.solution_template, advantage=config.rl.advantage,
        adv_eps=config.rl.adv_eps,
        control=ControlConfig(gate_std=e.gate_std, gate_tol=e.gate_tol, cutoff_factor=e.cutoff_factor,
                                           max_hint_notions=e.max_hint_notions),
        gating=e.gating, cutoff=e.cutoff, hints=e.hints)


def verifier_config(config) -> VerifierConfig:
    """The verifier pool of a run (training, its held-out evaluation and `evaluate` alike)."""
    r = config.reward
    return VerifierConfig(num_workers=r.num_workers, per_item_timeout_s=r.per_item_timeout_s,
                                      batch_budget_s=r.batch_budget_s, fallback=r.answer_fallback)


def loss_config(config) -> LossConfig:
    """The clipped policy loss (docs/method.md §3), scored at the rollout temperature."""
    r = config.rl
    return LossConfig(clip_low=r.clip_low, clip_high=r.clip_high, clip_c=r.clip_c, agg=r.loss_agg,
                                 kl_coef=r.kl_coef, kl_estimator=r.kl_estimator,
                                 temperature=config.rollout.temperature, chunk_size=r.chunk_size)


def optim_config(config) -> OptimConfig:
    """AdamW with warm-up for RL, and the constant BC learning rate on the same state."""
    r = config.rl
    return OptimConfig(learning_rate=r.lr, warmup_steps=r.warmup_steps, weight_decay=r.weight_decay,
                                  clip_norm=r.clip_norm, bc_learning_rate=config.bc.lr)


def sampler_config(config, eos_ids: Sequence[int], *, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None) -> SamplerConfig:
    """The sampler of a run (training rollouts, held-out evaluation and `evaluate` alike): the rollout
    section's knobs, with the temperature / top-p / top-k overridden where given."""
    r = config.rollout
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SamplerConfig(temperature=pick(temperature, r.temperature), top_p=pick(top_p, r.top_p),
                         top_k=pick(top_k, r.top_k), eos_ids=tuple(eos_ids), num_slots=r.num_slots)


def rollout_engine_for(config, model_cfg, eos_ids: Sequence[int], mesh=None, params=None, *,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None) -> rollout_engine.RolloutEngine:
    """The run's rollout engine (`config.rollout.engine`) with its sampler (`sampler_config`), holding
    `params` when given: what training, its held-out evaluation, `evaluate` and the lm-eval backend sample
    with."""
    spec = rollout_engine.EngineSpec(model_cfg, sampler_config(config, eos_ids, temperature=temperature,
                                                               top_p=top_p, top_k=top_k), mesh)
    return rollout_engine.make_engine(config.rollout.engine, spec, params)


def updater_config(config) -> UpdaterConfig:
    """The run's updates: the loss and optimiser, PPO mini-batching, BC, LoRA."""
    return UpdaterConfig(
        loss=loss_config(config), optim=optim_config(config), micro_batch_size=config.rl.micro_batch_size,
        max_len=config.data.max_prompt_length + max(config.rollout.max_response_length,
                                                    config.rollout.meta_max_new_tokens),
        mini_batch_size=config.rl.mini_batch_size, ppo_epochs=config.rl.ppo_epochs, bc_steps=config.bc.steps,
        bc_chunk_size=config.rl.chunk_size, seed=config.seed, lora=lora_config(config))


def lora_config(config) -> LoraConfig | None:
    """The run's LoRA adapters (config.lora), None for full fine-tuning (rank 0)."""
    c = config.lora
    if c.rank == 0:
        return None
    return LoraConfig(rank=int(c.rank), alpha=float(c.alpha), targets=tuple(c.targets),
                      base_quantization=str(c.base_quantization))
