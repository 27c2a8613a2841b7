"""config.resolve rejects values that would fail (or divide by zero) only later, naming the field."""
import pytest

from masa_jax import config as config_lib
from masa_jax.errors import UserError


def _config(**overrides):
    c = config_lib.base_config()
    c.model.path = "/some/model"
    return config_lib.override(c, overrides)


def test_the_base_and_shipped_configs_resolve():
    resolved = config_lib.resolve(_config())
    assert resolved.model.tokenizer_path == "/some/model"


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_is_rejected(temperature):
    # token_logprobs divides the logits by the temperature: 0 would be a division by zero in training.
    with pytest.raises(UserError, match=r"config\.rollout\.temperature must be > 0"):
        config_lib.resolve(_config(**{"rollout.temperature": temperature}))


@pytest.mark.parametrize("field", [
    "checkpoint.every", "total_steps", "data.problems_per_step", "rollout.num_solutions", "rollout.num_meta",
    "rl.micro_batch_size", "rl.ppo_epochs", "rl.chunk_size", "checkpoint.max_to_keep", "meta.k",
    "bc.buffer_size", "rollout.num_slots", "data.max_prompt_length", "rollout.max_response_length"])
def test_counts_below_one_are_rejected_naming_the_field(field):
    with pytest.raises(UserError, match=rf"config\.{field} must be >= 1, got 0"):
        config_lib.resolve(_config(**{field: 0}))


@pytest.mark.parametrize("field,value,match", [
    ("algorithm", "mas", "config.algorithm must be one of"),
    ("rollout.top_p", 0.0, r"config\.rollout\.top_p must be in \(0, 1\]"),
    ("rollout.top_p", 1.5, r"config\.rollout\.top_p must be in \(0, 1\]"),
    ("rollout.top_k", -1, r"config\.rollout\.top_k must be >= 0"),
    ("data.on_error", "ignore", "config.data.on_error must be one of"),
])
def test_other_bad_values_are_rejected_naming_the_field(field, value, match):
    with pytest.raises(UserError, match=match):
        config_lib.resolve(_config(**{field: value}))


def test_user_errors_are_value_errors():
    # Callers that caught resolve's ValueError before keep working.
    assert issubclass(UserError, ValueError)
