"""`sampling.generate` against `transformers` and against the model's own forward pass.

All calls share GEN's static shapes (2 slots for 5+ prompts, so refill is always exercised) to compile
each executable once per model and sampling mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from masa_jax import sampling
from masa_jax.models import qwen

KEY = jax.random.key(42)
MAX_NEW = 12  # = conftest.MAX_NEW (tiny.max_new)
# Unfiltered sampling: temperature is traced, so 0.8 here and 1.0 below share executables. Top-k / top-p
# sets are checked against a sort-based reference in test_sampling_fns.py (same `sample` function).
SAMPLED = dict(temperature=0.8)


def _gen(tiny, prompts=None, **kw):
    assert tiny.max_new == MAX_NEW
    args = dict(tiny.gen, rng=KEY, temperature=0.0) | kw
    return sampling.generate(tiny.cfg, tiny.params, tiny.prompts if prompts is None else prompts, **args)


def _forward_logprobs(tiny, prompts, outs, temperature=1.0):
    """Per sequence: the model's log softmax(logits / temperature) at each generated token, from one
    jitted full-sequence forward of prompt + output (right-padded batch)."""
    seqs = [p + o for p, o in zip(prompts, outs)]
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        toks[i, :len(s)], mask[i, :len(s)] = s, True
    logits = np.asarray(_FORWARD(tiny.cfg, tiny.params, jnp.asarray(toks), jnp.asarray(mask)), np.float64)
    logp = logits / temperature
    logp -= np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logp.max(-1, keepdims=True)
    out = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        rows = logp[i, len(p) - 1:len(p) + len(o) - 1]
        out.append(rows[np.arange(len(o)), o])
    return out


_FORWARD = jax.jit(qwen.forward, static_argnums=0)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
@pytest.mark.parametrize("refill", [True, False])
def test_greedy_matches_transformers(kind, refill, request):
    tiny = request.getfixturevalue(f"{kind}_tiny")
    out = _gen(tiny, refill=refill)
    assert out.tokens == tiny.greedy
    assert out.finish_reasons == ["max_new_tokens"] * len(tiny.prompts)
    assert out.stats.num_slots == 2 < len(tiny.prompts)


def test_greedy_budgets_truncate_transformers_output(qwen3_tiny):
    budgets = [5, 0, 1, None, MAX_NEW]
    out = _gen(qwen3_tiny, budgets=budgets)
    for b, ref, got, why in zip(budgets, qwen3_tiny.greedy, out.tokens, out.finish_reasons):
        assert got == ref[:MAX_NEW if b is None else b]
        # A budget equal to the global cap cuts nothing: the same finish reason as no budget (issue 11.1).
        assert why == ("max_new_tokens" if b is None or b == MAX_NEW else "budget")
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]


def test_on_done_counts_every_prompt_as_it_finishes(qwen3_tiny):
    """The progress hook: a prompt with no budget counts at once, the others as their slots finish; the
    counts sum to the number of prompts and the outputs are those without the hook."""
    budgets = [5, 0, 1, None, MAX_NEW]
    counts = []
    out = _gen(qwen3_tiny, budgets=budgets, on_done=counts.append)
    assert counts[0] == 1 and sum(counts) == 5 and len(counts) >= 3  # 2 slots: several harvests
    assert out.tokens == _gen(qwen3_tiny, budgets=budgets).tokens


def test_many_requests_through_two_slots_with_refill(qwen3_tiny):
    """40 requests with random budgets (0..12) through 2 slots: refill bookkeeping, cache buckets that
    grow (16 -> 64) and shrink back, and static batches give the same outputs."""
    rs = np.random.RandomState(3)
    idx = rs.randint(0, 5, 40)
    budgets = rs.randint(0, MAX_NEW + 1, 40).tolist()
    prompts = [qwen3_tiny.prompts[i] for i in idx]
    expected = [qwen3_tiny.greedy[i][:b] for i, b in zip(idx, budgets)]
    out = _gen(qwen3_tiny, prompts, budgets=budgets, cache_buckets=(16,))
    assert out.tokens == expected
    assert {("decode", 16), ("decode", 64), ("resize", 16, 64), ("resize", 64, 16)} <= out.stats.shapes
    static = _gen(qwen3_tiny, prompts, budgets=budgets, refill=False, schedule="fifo")
    assert static.tokens == expected
    assert out.stats.decode_steps < static.stats.decode_steps


def test_eos_stops_and_is_kept_including_first_token(qwen3_tiny):
    g = qwen3_tiny.greedy
    eos = {g[0][3], g[1][0]}  # prompt 1 stops at its very first token
    out = _gen(qwen3_tiny, eos_ids=sorted(eos))
    for ref, got, why in zip(g, out.tokens, out.finish_reasons):
        cut = next((i for i, t in enumerate(ref) if t in eos), None)
        assert got == (ref if cut is None else ref[:cut + 1])
        assert why == ("max_new_tokens" if cut is None else "eos")
    assert out.tokens[1] == [g[1][0]] and out.finish_reasons[1] == "eos"


def test_greedy_logprobs_equal_forward(qwen3_tiny):
    out = _gen(qwen3_tiny)
    for got, want in zip(out.logprobs, _forward_logprobs(qwen3_tiny, qwen3_tiny.prompts, out.tokens)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_sampled_logprobs_equal_forward_at_temperature(qwen3_tiny):
    out = _gen(qwen3_tiny, **SAMPLED)
    want = _forward_logprobs(qwen3_tiny, qwen3_tiny.prompts, out.tokens, SAMPLED["temperature"])
    for got, w in zip(out.logprobs, want):
        np.testing.assert_allclose(got, w, atol=1e-4)


def test_sampling_reproducible_and_independent_of_schedule(qwen3_tiny):
    prompts = qwen3_tiny.prompts * 2
    budgets = [3, 12, 7, 1, 9, 12, 2, 5, 12, 4]
    a = _gen(qwen3_tiny, prompts, budgets=budgets, **SAMPLED)
    b = _gen(qwen3_tiny, prompts, budgets=budgets, **SAMPLED)
    c = _gen(qwen3_tiny, prompts, budgets=budgets, refill=False, schedule="fifo", **SAMPLED)
    d = _gen(qwen3_tiny, prompts, budgets=budgets, **(SAMPLED | dict(rng=jax.random.key(1))))
    assert a.tokens == b.tokens == c.tokens
    assert a.tokens != d.tokens
    assert [len(t) for t in a.tokens] == budgets
    # Same prompt, different request index: independent draws.
    assert a.tokens[1] != a.tokens[6] or a.tokens[4] != a.tokens[9]


def test_first_token_distribution_matches_model(qwen3_tiny):
    """Temperature 1, budget 1: 3000 draws of the first token of one prompt vs the model's softmax."""
    prompt = qwen3_tiny.prompts[3]
    n = 3000
    out = _gen(qwen3_tiny, [prompt] * n, budgets=[1] * n, temperature=1.0)
    toks = np.array([t[0] for t in out.tokens])
    batch = np.zeros((5, 24), np.int32)  # the shape _forward_logprobs compiled for
    batch[0, :len(prompt)] = prompt
    logits = np.asarray(_FORWARD(qwen3_tiny.cfg, qwen3_tiny.params, jnp.asarray(batch),
                                 jnp.asarray(batch > -1)))[0, len(prompt) - 1]
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    counts = np.bincount(toks, minlength=len(p))
    order = np.argsort(p)  # merge the rarest tokens into one bin so every expected count is >= 5
    small = np.cumsum(p[order]) * n < 5
    bins = np.concatenate([[counts[order[small]].sum()], counts[order[~small]]])
    exp = np.concatenate([[p[order[small]].sum()], p[order[~small]]]) * n
    assert stats.chisquare(bins, exp).pvalue > 1e-3
    assert out.finish_reasons == ["budget"] * n


def test_edge_cases_raise_or_work(qwen3_tiny):
    tiny = qwen3_tiny
    with pytest.raises(ValueError, match="empty"):
        _gen(tiny, [[1, 2], []])
    with pytest.raises(ValueError, match="max_cache_len"):
        _gen(tiny, [list(range(60))])  # 60 + 12 - 1 > 64
    with pytest.raises(ValueError, match="max_cache_len"):
        _gen(tiny, [list(range(70))], budgets=[0])  # the prompt alone is longer than the cache
    with pytest.raises(ValueError, match="budgets"):
        _gen(tiny, budgets=[1, 2])
    with pytest.raises(ValueError, match="outside"):
        _gen(tiny, [[tiny.cfg.vocab_size]])
    with pytest.raises(ValueError, match="top_p"):
        _gen(tiny, temperature=1.0, top_p=0.0)
    out = _gen(tiny, max_new_tokens=0)
    assert out.tokens == [[]] * 5 and out.finish_reasons == ["max_new_tokens"] * 5
    out = _gen(tiny, budgets=[0] * 5)
    assert out.tokens == [[]] * 5 and out.finish_reasons == ["budget"] * 5
    assert all(lp.shape == (0,) and lp.dtype == np.float32 for lp in out.logprobs)
    out = _gen(tiny, [])
    assert out.tokens == [] and out.finish_reasons == []
    # A budget above max_new_tokens is capped by it.
    out = _gen(tiny, budgets=[100] * 5)
    assert out.tokens == tiny.greedy and out.finish_reasons == ["max_new_tokens"] * 5


def test_bucket_helpers():
    from masa_jax.sampling.generate import _prefill_rows, default_cache_buckets

    assert default_cache_buckets(160) == (64, 96, 128, 160)
    assert default_cache_buckets(1056) == (64, 96, 128, 160, 192, 224, 256, 384, 512, 768, 1024, 1056)
    assert default_cache_buckets(40) == (40,)
    assert [_prefill_rows(k, 256) for k in (1, 2, 4, 5, 17, 64, 65, 256)] == [1, 4, 4, 16, 64, 64, 256, 256]
    assert [_prefill_rows(k, 8) for k in (1, 3, 5, 8)] == [1, 4, 8, 8]


def test_sampler_config_equals_keywords(qwen3_tiny):
    """`sampler=SamplerConfig(...)` is the same call as the individual keywords (outputs and stats), is
    validated when built, and cannot be mixed with non-default keywords."""
    budgets = [3, 12, 7, 1, 9]
    kw = dict(temperature=0.8, eos_ids=[qwen3_tiny.greedy[0][3]], num_slots=2, max_cache_len=64, refill_fraction=0.5,
              cache_buckets=[16], schedule="fifo")
    a = sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, qwen3_tiny.prompts, rng=KEY, max_new_tokens=MAX_NEW,
                          budgets=budgets, **kw)
    sc = sampling.SamplerConfig(**kw)
    assert sc.eos_ids == (qwen3_tiny.greedy[0][3],) and sc.cache_buckets == (16,)
    b = sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, qwen3_tiny.prompts, rng=KEY, max_new_tokens=MAX_NEW,
                          budgets=budgets, sampler=sc)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    assert all(np.array_equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    for f in ("num_slots", "decode_calls", "decode_steps", "prefill_calls", "resizes", "generated_tokens", "shapes"):
        assert getattr(a.stats, f) == getattr(b.stats, f), f
    with pytest.raises(TypeError, match="num_slots"):
        sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, qwen3_tiny.prompts, rng=KEY, max_new_tokens=MAX_NEW,
                          sampler=sc, num_slots=4)
    for bad, match in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                       (dict(schedule="lifo"), "schedule"), (dict(refill_fraction=0.0), "refill_fraction")]:
        with pytest.raises(ValueError, match=match):
            sampling.SamplerConfig(**bad)


def test_requests_with_one_prompt_share_its_prefill_and_sample_as_if_alone(qwen3_tiny):
    """Prefix sharing: a group of G requests with the same prompt (GRPO's rollouts of one problem) runs the
    prompt's forward once per refill, and each request still draws its own tokens from its own key: the
    rows equal those of a 1-slot run, where no two requests meet in a prefill, and of share_prompts=False."""
    group = [qwen3_tiny.prompts[1]] * 4 + [qwen3_tiny.prompts[3]] * 4
    kw = dict(rng=KEY, max_new_tokens=MAX_NEW, max_cache_len=64, **SAMPLED)
    shared = sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, group, num_slots=8, **kw)
    alone = sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, group, num_slots=1, **kw)
    unshared = sampling.generate(qwen3_tiny.cfg, qwen3_tiny.params, group, sampler=sampling.SamplerConfig(
        num_slots=8, max_cache_len=64, share_prompts=False, **SAMPLED), rng=KEY, max_new_tokens=MAX_NEW)
    assert shared.tokens == alone.tokens == unshared.tokens
    assert unshared.stats.prefill_rows == 8  # one row per request (8 slots: at most 8 rows a call)
    for a, b in zip(shared.logprobs, alone.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len({tuple(t) for t in shared.tokens[:4]}) > 1  # the group's rows differ: their own keys
    assert shared.stats.prefill_rows == 4 and alone.stats.prefill_rows == 8  # 2 distinct prompts: one call of 4 rows (a power of four) instead of 8 calls of 1
