"""Each component's frozen config, built from the run config in this one place: the rollout, the loss
and the optimiser, BC, the updates, the verifier pool, the sampler and LoRA. The trainer, `evaluate` and
the experiments call these, so a component runs the same way everywhere.

One name per setting: a component field is filled from the run-config leaf of the same name in its
sections (`SECTIONS`; config.py declares those leaves with `settings_of` the component, so the default
is the component's too). Only values computed from several settings, or from outside the config (the
tokenizer's EOS ids), are passed by hand.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from masa_jax import config as config_lib
from masa_jax.errors import UserError
from masa_jax.models.qwen.lora import LoraConfig
from masa_jax.rewards.math import VerifierConfig
from masa_jax.rl import rollout_engine
from masa_jax.rl.bc import BCConfig
from masa_jax.rl.controls import ControlConfig
from masa_jax.rl.rollout import RolloutConfig
from masa_jax.rl.train_step import LossConfig, OptimConfig
from masa_jax.rl.update import UpdaterConfig
from masa_jax.sampling.generate import SamplerConfig

# component config -> the run-config sections whose leaves fill its fields, by name.
SECTIONS = {
    RolloutConfig: ("rollout", "meta", "prompts", "rl", "efficient"),
    ControlConfig: ("efficient",),
    SamplerConfig: ("rollout",),
    LossConfig: ("rl",),
    OptimConfig: ("rl",),
    UpdaterConfig: ("rl",),
    BCConfig: ("bc",),
    VerifierConfig: ("reward",),
    LoraConfig: ("lora",),
}


def build(component, config, **derived):
    """`component` (a key of SECTIONS) from the leaves of its fields' names in its sections of the run
    config, with `derived` for the fields computed elsewhere; a field with neither keeps its default.
    The component's own validation (`__post_init__`) becomes a UserError naming the sections."""
    sections = SECTIONS[component]
    values = dict(derived)
    for f in dataclasses.fields(component):
        if f.name in derived:
            continue
        found = [s for s in sections if f.name in config[s]]
        if len(found) > 1:  # config.py's _section keeps names unique within a section, not across
            raise TypeError(f"{component.__name__}.{f.name} is a setting of several sections: {found}")
        if found:
            value = config[found[0]][f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return component(**values)
    except ValueError as e:
        where = ", ".join(f"config.{s}" for s in sections)
        raise UserError(f"{where}: {e}") from e


def rollout_config(config) -> RolloutConfig:
    """One step's rollouts: both paths, the meta reward, the advantages, MASA-efficient's controls."""
    return build(RolloutConfig, config, use_meta=config_lib.uses_meta(config),
                 control=build(ControlConfig, config))


def verifier_config(config) -> VerifierConfig:
    """The verifier pool of a run (training, its held-out evaluation and `evaluate` alike)."""
    return build(VerifierConfig, config)


def loss_config(config) -> LossConfig:
    """The clipped policy loss (docs/method.md §3), scored at the rollout temperature."""
    return build(LossConfig, config, temperature=config.rollout.temperature)


def optim_config(config) -> OptimConfig:
    """AdamW with warm-up for RL (BC's constant learning rate is `bc_config`'s, on the same state)."""
    return build(OptimConfig, config)


def bc_config(config) -> BCConfig:
    """Behaviour cloning of the best meta-trajectories (masa / masa_efficient)."""
    return build(BCConfig, config)


def sampler_config(config, eos_ids: Sequence[int], *, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None) -> SamplerConfig:
    """The sampler of a run (training rollouts, held-out evaluation and `evaluate` alike): the rollout
    section's knobs, with the temperature / top-p / top-k overridden where given."""
    overrides = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
                 if v is not None}
    return build(SamplerConfig, config, eos_ids=tuple(eos_ids), **overrides)


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
    return build(UpdaterConfig, config, loss=loss_config(config), optim=optim_config(config), bc=bc_config(config),
                 max_len=config.data.max_prompt_length + max(config.rollout.max_response_length,
                                                             config.rollout.meta_max_new_tokens),
                 max_prompt_len=config.data.max_prompt_length, seed=config.seed, lora=lora_config(config))


def lora_config(config) -> LoraConfig | None:
    """The run's LoRA adapters (config.lora), None for full fine-tuning (rank 0)."""
    return None if config.lora.rank == 0 else build(LoraConfig, config)


def check(config) -> None:
    """Builds every component config of `config` once, so a value a component refuses is a one-line
    UserError at start-up (`config.resolve`), not a traceback when the component is first built."""
    rollout_config(config), verifier_config(config), updater_config(config), sampler_config(config, ())
