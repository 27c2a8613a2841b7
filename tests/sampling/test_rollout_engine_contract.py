"""The `RolloutEngine` contract (masa_jax/rl/rollout_engine.py), checked for every registered engine against
transformers on a tiny random Qwen3: greedy tokens, per-request budgets and their finish reasons, stop ids,
log-probs under logits / T, determinism in the key, and weight sync through `update_params`. A new engine
(vLLM-TPU, sglang-jax, ...) registered with `register_engine` is tested here by being registered."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from masa_jax.rl import rollout_engine
from masa_jax.sampling import SamplerConfig

ENGINES = sorted(rollout_engine.ENGINES)


def _engine(name, tiny, params=None, **sampler):
    spec = rollout_engine.EngineSpec(tiny.cfg, SamplerConfig(**({"temperature": 0.0, "num_slots": 2,
                                                                  "max_cache_len": 64} | sampler)))
    return rollout_engine.make_engine(name, spec, tiny.params if params is None else params)


def _hf_logprobs(hf, prompt, tokens, temperature):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()


@pytest.mark.parametrize("name", ENGINES)
def test_greedy_rows_are_transformers_in_input_order(name, qwen3_tiny):
    engine = _engine(name, qwen3_tiny)
    assert isinstance(engine, rollout_engine.RolloutEngine)
    out = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(0))
    assert out.tokens == qwen3_tiny.greedy
    assert out.finish_reasons == ["max_new_tokens"] * len(qwen3_tiny.prompts)
    for p, toks, lp in zip(qwen3_tiny.prompts, out.tokens, out.logprobs):
        assert lp.dtype == np.float32 and lp.shape == (len(toks),)
        np.testing.assert_allclose(lp, _hf_logprobs(qwen3_tiny.hf, p, toks, 1.0), atol=2e-4)  # raw logits


@pytest.mark.parametrize("name", ENGINES)
def test_budgets_cut_rows_and_name_the_reason(name, qwen3_tiny):
    """A budget below max_new_tokens is a cutoff ("budget", exactly that many tokens); one at or above it
    is no cutoff ("max_new_tokens")."""
    engine = _engine(name, qwen3_tiny)
    m = qwen3_tiny.max_new
    budgets = [3, m, m + 8, 1, 5]
    out = engine.generate(qwen3_tiny.prompts, budgets, m, jax.random.key(0))
    assert out.finish_reasons == ["budget", "max_new_tokens", "max_new_tokens", "budget", "budget"]
    for toks, greedy, b in zip(out.tokens, qwen3_tiny.greedy, budgets):
        assert toks == greedy[:min(b, m)]


@pytest.mark.parametrize("name", ENGINES)
def test_a_stop_id_ends_the_row_and_is_kept(name, qwen3_tiny):
    engine = _engine(name, qwen3_tiny)
    greedy = qwen3_tiny.greedy[3]
    stop = greedy[4]
    first = greedy.index(stop)
    out = engine.generate([qwen3_tiny.prompts[3]], None, qwen3_tiny.max_new, jax.random.key(0), stop_ids=(stop,))
    assert out.tokens[0] == greedy[:first + 1] and out.finish_reasons == ["eos"]
    # The call's stop ids do not stick to the engine.
    again = engine.generate([qwen3_tiny.prompts[3]], None, qwen3_tiny.max_new, jax.random.key(0))
    assert again.tokens[0] == greedy and again.finish_reasons == ["max_new_tokens"]


@pytest.mark.parametrize("name", ENGINES)
def test_sampled_logprobs_are_under_logits_over_temperature_and_the_key_fixes_the_rows(name, qwen3_tiny):
    engine = _engine(name, qwen3_tiny)
    t = 0.7
    a = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(3), temperature=t, top_k=20)
    b = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(3), temperature=t, top_k=20)
    c = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(4), temperature=t, top_k=20)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != qwen3_tiny.greedy
    for p, toks, lp in zip(qwen3_tiny.prompts, a.tokens, a.logprobs):
        # under the full distribution: top-k restricts the sampling, not the scoring
        np.testing.assert_allclose(lp, _hf_logprobs(qwen3_tiny.hf, p, toks, t), atol=2e-4)


@pytest.mark.parametrize("name", ENGINES)
def test_update_params_syncs_the_weights(name, qwen3_tiny):
    engine = _engine(name, qwen3_tiny)
    before = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(0))
    other = jax.tree.map(lambda x: x * 1.5, qwen3_tiny.params)
    engine.update_params(other)
    after = engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(0))
    fresh = _engine(name, qwen3_tiny, params=other).generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new,
                                                              jax.random.key(0))
    assert after.tokens == fresh.tokens and after.tokens != before.tokens
    engine.update_params(None)  # released: sampling now is a mistake, said as such
    with pytest.raises(RuntimeError, match="update_params"):
        engine.generate(qwen3_tiny.prompts, None, qwen3_tiny.max_new, jax.random.key(0))


def test_unknown_engine_is_named_and_a_registered_one_is_built():
    with pytest.raises(ValueError, match=r"unknown rollout engine 'vllm': one of \['native'"):
        rollout_engine.make_engine("vllm", rollout_engine.EngineSpec(None, SamplerConfig()))

    class Recording(rollout_engine.FunctionEngine):
        def __init__(self, spec):
            super().__init__(lambda prompts, budgets, max_new_tokens, rng: ("called", len(prompts)))

    rollout_engine.register_engine("recording", Recording)
    try:
        engine = rollout_engine.make_engine("recording", rollout_engine.EngineSpec(None, SamplerConfig()))
        assert engine.generate([[1], [2]], None, 4, None, temperature=0.5) == ("called", 2)
    finally:
        del rollout_engine.ENGINES["recording"]


def test_config_rollout_engine_is_checked():
    from masa_jax import config as config_lib
    from masa_jax.errors import UserError
    c = config_lib.base_config()
    c.model.path = "/m"
    c.rollout.engine = "vllm"
    with pytest.raises(UserError, match=r"config.rollout.engine must be one of \('native',\), got 'vllm'"):
        config_lib.resolve(c)
