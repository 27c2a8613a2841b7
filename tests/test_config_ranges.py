"""Values that were silently accepted (or raised only at step 1) are refused by config.resolve, naming the
field and its valid range (issue 19.5)."""
import pytest

from masa_jax import config as config_lib
from masa_jax.errors import UserError

BAD = [
    ("rl.lr", -1.0), ("rl.lr", float("nan")), ("rl.lr", float("inf")), ("rl.warmup_steps", -5),
    ("rl.clip_low", -5.0), ("efficient.cutoff_factor", -1.0), ("efficient.gate_std", float("nan")),
    ("rl.kl_coef", -1.0), ("bc.lr", -1.0), ("meta.weights", (2.0, -1.0, 0.0)), ("model.param_dtype", "int8"),
    ("model.dtype", "float7"), ("prompts.min_solution_length", -10), ("rollout.max_response_length", 10**9),
    ("meta.base", 2.0), ("rl.advantage", "bogus"), ("model.remat", "bogus"), ("model.attention_impl", "bogus"),
    ("rl.kl_estimator", "bogus"), ("reward.batch_budget_s", 0.0), ("reward.per_item_timeout_s", -1.0),
    ("reward.answer_fallback", "bogus"), ("mesh.shape", (0, -1, 1)), ("mesh.shape", (2, -1, -1)),
    ("prompts.meta_template", "Predict for: {problem}"), ("prompts.solution_template", "Solve it."),
    ("prompts.solution_template", "{question} in {steps} steps"), ("prompts.solution_template", "{question} \\boxed{}"),
    ("log.num_samples", -1), ("log.num_samples", True),
]


def _config(**overrides):
    c = config_lib.base_config()
    c.model.path = "/m"
    return config_lib.override(c, overrides)


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(UserError, match=rf"config\.{field.replace('.', '[.]')}"):
        config_lib.resolve(_config(**{field: value}))


def test_defaults_and_shipped_values_pass():
    config_lib.resolve(_config())
    config_lib.resolve(_config(**{"prompts.solution_template": "Q: {question} \\boxed{{}}", "meta.base": 0.5,
                                  "prompts.meta_template": "{question}: 0..{k}, {min_length}-{max_length}"}))


def test_the_checked_template_fields_are_the_ones_the_prompts_format():
    from masa_jax.rl import prompts
    meta = " ".join("{%s}" % f for f in prompts.META_FIELDS)
    assert prompts.meta_prompt("Q?", template=meta, k=8, max_length=4096, system=None)[0]["content"] == \
        "Q? 8 %d 4096 4 1024" % prompts.MIN_SOLUTION_LENGTH
    assert prompts.solution_prompt("Q?", template="{question}!")[0]["content"] == "Q?!"
