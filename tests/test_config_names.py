"""One name per setting: the run config's component sections are the components' own fields.

Every leaf of a section that `components.SECTIONS` maps to a component is a field of such a component
(or one of the few settings the loop reads itself), every such field reaches the built component from
the leaf of its own name, and a value the component refuses is a one-line UserError at start-up.
"""
from __future__ import annotations

import dataclasses

import pytest

from masa_jax import components, config as config_lib
from masa_jax.errors import UserError
from masa_jax.models.qwen.lora import LoraConfig

# Settings of component sections that no component has: the training loop reads them by these names.
LOOP_SETTINGS = {"rollout.engine", "efficient.switch_step", "efficient.auto_switch_threshold",
                 "efficient.auto_switch_window"}

# A valid value other than the default, for the string settings (numbers and flags are derived).
OTHER_STRINGS = {"loss_agg": "seq-mean-token-sum", "kl_estimator": "k1", "advantage": "rloo",
                 "answer_fallback": "last_number", "start_method": "spawn",
                 "meta_template": "M {question}", "solution_template": "S {question}", "base_quantization": "int8"}


def _other(name, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 0.5 + 0.125 if value <= 1 else value + 0.5  # top_p, temperature stay valid
    if name == "weights":
        return (0.5, 0.25, 0.25)
    if name == "targets":
        return ("q_proj", "v_proj")
    return OTHER_STRINGS[name]  # a KeyError: add a valid alternative for the new string setting


def _sections():
    return sorted({s for sections in components.SECTIONS.values() for s in sections})


def test_every_leaf_of_a_component_section_is_a_field_of_its_component():
    c = config_lib.base_config()
    for section in _sections():
        fields = set().union(*({f.name for f in dataclasses.fields(cls)}
                               for cls, secs in components.SECTIONS.items() if section in secs))
        stray = {f"{section}.{k}" for k in c[section].keys() if k not in fields} - LOOP_SETTINGS
        assert not stray, f"settings named unlike any component field (a rename?): {sorted(stray)}"


def test_each_component_field_comes_from_the_leaf_of_its_own_name():
    """Set every leaf of the component sections to another valid value: each built component holds it
    under the same name (a builder that renamed or dropped a setting fails here)."""
    c = config_lib.base_config()
    c.algorithm = "masa_efficient"
    c.lora.rank = 4
    expected = {}
    for section in _sections():
        for name, value in c[section].items():
            if f"{section}.{name}" in LOOP_SETTINGS or (section, name) == ("lora", "rank"):
                continue
            new = _other(name, value)
            c[section][name] = new
            expected[(section, name)] = new
    built = {
        "rollout": [components.rollout_config(c), components.sampler_config(c, (7,))],
        "meta": [components.rollout_config(c)],
        "prompts": [components.rollout_config(c)],
        "efficient": [components.rollout_config(c), components.rollout_config(c).control],
        "rl": [components.rollout_config(c), components.loss_config(c), components.optim_config(c),
               components.updater_config(c)],
        "bc": [components.bc_config(c), components.updater_config(c).bc],
        "reward": [components.verifier_config(c)],
        "lora": [components.lora_config(c), components.updater_config(c).lora],
    }
    assert set(built) == set(_sections())
    for (section, name), new in expected.items():
        holders = [obj for obj in built[section] if name in {f.name for f in dataclasses.fields(obj)}]
        assert holders, f"{section}.{name} reaches no component"
        for obj in holders:
            got = getattr(obj, name)
            assert got == (tuple(new) if isinstance(new, list) else new), (section, name, got, new)
    assert components.updater_config(c).lora == LoraConfig(rank=4, alpha=c.lora.alpha, targets=("q_proj", "v_proj"),
                                                            base_quantization="int8")
    # Derived fields: the loss scores at the rollout temperature; the sampler stops at the tokenizer's EOS.
    assert components.loss_config(c).temperature == c.rollout.temperature
    assert components.sampler_config(c, (7,)).eos_ids == (7,)


def test_a_component_default_is_the_run_default_unless_the_run_says_otherwise():
    c = config_lib.base_config()
    run_defaults = {("rl", "mini_batch_size"): 128, ("rl", "micro_batch_size"): 8, ("rollout", "num_slots"): 256,
                    ("rollout", "num_solutions"): 16, ("rollout", "num_meta"): 16,
                    ("rollout", "max_response_length"): 8192, ("rollout", "meta_max_new_tokens"): 8192,
                    ("lora", "rank"): 0, ("lora", "alpha"): 16.0}
    for cls, sections in components.SECTIONS.items():
        for f in dataclasses.fields(cls):
            for s in sections:
                if f.name in c[s] and (s, f.name) not in run_defaults:
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    assert c[s][f.name] == default, (cls.__name__, s, f.name)
    for (s, name), value in run_defaults.items():
        assert c[s][name] == value


def test_overrides_on_the_command_line_reach_the_component():
    """--config.rl.lr etc.: the ml_collections override path, through resolve, to the component."""
    c = config_lib.override(config_lib.base_config(), {"rl.lr": 2e-6, "bc.lr": 3e-6, "rl.loss_agg": "seq-mean-token-mean",
                                                       "reward.answer_fallback": "answer_is", "rl.b2": 0.95})
    c = config_lib.resolve(c)
    u = components.updater_config(c)
    assert (u.optim.lr, u.bc.lr, u.loss.loss_agg, u.optim.b2) == (2e-6, 3e-6, "seq-mean-token-mean", 0.95)
    assert components.verifier_config(c).answer_fallback == "answer_is"


@pytest.mark.parametrize("field,value,words", [
    ("reward.start_method", "fork", "config.reward: start_method must be 'spawn' or 'forkserver'"),
    ("reward.mv_timeout_s", 0, "config.reward: num_workers, chunk_size and mv_timeout_s must be >= 1"),
    ("rl.b1", 1.0, "config.rl.b1 must be in [0, 1)"),
    ("rl.eps", 0.0, "config.rl.eps must be a finite number > 0"),
    ("rl.weight_decay", -0.1, "config.rl.weight_decay must be a finite number >= 0"),
    ("rl.clip_norm", 0.0, "config.rl.clip_norm must be a finite number > 0"),
    ("efficient.gate_min_valid", -1, "config.efficient.gate_min_valid must be an integer >= 0"),
    ("reward.max_answer_chars", 0, "config.reward.max_answer_chars must be >= 1"),
])
def test_a_value_a_component_refuses_is_a_one_line_error_at_start(field, value, words):
    c = config_lib.override(config_lib.base_config(), {field: value})
    with pytest.raises(UserError) as e:
        config_lib.resolve(c)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_setting_cannot_be_named_twice():
    from masa_jax.rl.train_step import LossConfig, OptimConfig
    with pytest.raises(TypeError, match="named twice"):
        config_lib._section(config_lib.settings_of(LossConfig), config_lib.settings_of(LossConfig, "clip_low"))
    with pytest.raises(TypeError, match="no fields"):
        config_lib.settings_of(OptimConfig, "learning_rate")
