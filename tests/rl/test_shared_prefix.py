"""Prefix sharing in the update (#23 item 4): the shared-prefix layout (`batching.pack_shared`) and
forward (`model.shared_prefix_hidden_states`) give the unshared rows' log-probs, loss and gradients
within float32 rounding, in the RL step, the old-log-prob pass and with KL; the packer's placement."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax.models.qwen import token_logprobs
from masa_jax.models.qwen.logprobs import shared_prefix_logprobs
from masa_jax.rl import batching, train_step as ts


def grouped_sequences(seed=0, groups=(3, 4, 1, 2), vocab=64):
    """Problems with G rollouts each (different G), prompts and responses of different lengths; two
    problems with the same prompt text (they must share one prefix too)."""
    rng = np.random.default_rng(seed)
    prompts, responses, adv = [], [], []
    for g, size in enumerate(groups):
        prompt = list(rng.integers(1, vocab, int(rng.integers(3, 9))))
        for _ in range(size):
            prompts.append(prompt)
            responses.append(list(rng.integers(1, vocab, int(rng.integers(1, 7)))))
            adv.append(float(rng.normal()))
    prompts.append(prompts[0])  # the first problem's prompt again, in another group
    responses.append(list(rng.integers(1, vocab, 4)))
    adv.append(0.7)
    return prompts, responses, np.asarray(adv, np.float32)


def test_pack_shared_places_every_row_once_with_its_own_prompt():
    prompts, responses, adv = grouped_sequences()
    slp = [np.arange(len(r), dtype=np.float32) - 5 for r in responses]
    b, place = batching.pack_shared(prompts, responses, pad_id=0, rows_per_block=4, block_multiple=2,
                                    advantages=adv, sampler_logprobs=slp)
    assert b["tokens"].shape[0] % 2 == 0 and b["tokens"].shape[1] == 4
    assert len({tuple(p) for p in place.tolist()}) == len(prompts)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        blk, slot = place[i]
        j = b["prefix_index"][blk, slot]
        pm = b["prefix_mask"][blk, j]
        assert b["prefix_tokens"][blk, j][pm].tolist() == p
        assert b["tokens"][blk, slot][b["attention_mask"][blk, slot]].tolist() == r
        assert b["advantages"][blk, slot] == adv[i]
        np.testing.assert_array_equal(b["sampler_logprobs"][blk, slot, :len(r)], slp[i])
    # 11 rows in blocks of 4: prompts grouped, so no block holds more than 2 distinct prompts here...
    assert b["prefix_tokens"].shape[1] == 2
    # ...and the unshared layout would hold 11 prompt copies: this one holds fewer prompt tokens.
    assert b["prefix_mask"].sum() < sum(len(p) for p in prompts)
    np.testing.assert_array_equal(b["loss_mask"], b["attention_mask"])
    assert not b["attention_mask"][place[:, 0].max() + 1:].any()  # padding blocks are empty


def unshared_logprobs_at(cfg, params, prompts, responses, **kw):
    rows = batching.pack_sequences(prompts, responses, pad_id=0)
    lp = np.asarray(token_logprobs(cfg, params, rows["tokens"], rows["attention_mask"], **kw))
    return [lp[i, len(p):len(p) + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_logprobs_equal_the_unshared_rows(tiny, host_params, temperature):
    prompts, responses, _ = grouped_sequences(1)
    want = unshared_logprobs_at(tiny, host_params, prompts, responses, temperature=temperature, chunk_size=8)
    b, place = batching.pack_shared(prompts, responses, pad_id=0, rows_per_block=4)
    got = np.asarray(shared_prefix_logprobs(tiny, host_params, b["prefix_tokens"], b["prefix_mask"], b["tokens"],
                                            b["attention_mask"], b["prefix_index"], temperature=temperature,
                                            chunk_size=4))
    for i, r in enumerate(responses):
        np.testing.assert_allclose(got[place[i][0], place[i][1], :len(r)], want[i], rtol=1e-5, atol=2e-6)
    assert np.all(np.isfinite(got))


def _step_inputs(tiny, host_params, seed, micro):
    prompts, responses, adv = grouped_sequences(seed)
    rng = np.random.default_rng(seed + 10)
    want = unshared_logprobs_at(tiny, host_params, prompts, responses, chunk_size=8)
    old = [w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in want]  # ratio != 1: clipping acts
    rows = batching.pack_sequences(prompts, responses, pad_id=0, row_multiple=micro, advantages=adv,
                                   sampler_logprobs=old)
    rows["old_logprobs"] = rows.pop("sampler_logprobs")
    shared, _ = batching.pack_shared(prompts, responses, pad_id=0, rows_per_block=micro, advantages=adv,
                                     old_logprobs=old)
    return rows, shared


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_shared_prefix_loss_and_gradients_equal_the_unshared_rows(tiny, host_params, agg, kl_coef):
    loss_cfg = ts.LossConfig(chunk_size=8, loss_agg=agg, kl_coef=kl_coef)
    rows, shared = _step_inputs(tiny, host_params, 3, micro=4)
    params = jax.tree.map(jnp.asarray, host_params)
    ref = jax.tree.map(lambda x: x * 0.9, params) if kl_coef else None

    @functools.partial(jax.jit, static_argnums=0)
    def grads(micro, batch):
        loss_fn = functools.partial(ts.rl_loss, tiny, loss_cfg)
        return ts.accumulate_gradients(loss_fn, params, batch, micro, ref_params=ref)

    g_rows, m_rows = grads(4, rows)       # 3 micro-batches of 4 rows
    g_shared, m_shared = grads(4, shared)  # 3 blocks of 4 rows, one per micro-batch
    np.testing.assert_allclose(m_shared["loss"], m_rows["loss"], rtol=1e-5)
    assert abs(float(m_rows["loss"])) > 1e-3
    if kl_coef:
        np.testing.assert_allclose(m_shared["kl_loss"], m_rows["kl_loss"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_rows)):
        scale = float(np.max(np.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=0)
    # Tokens only in prompts get embedding gradient only through the prompts' backward (K / V and the
    # first response token's scoring state): it must be there, and it was compared above.
    prompt_only = sorted(set(shared["prefix_tokens"][shared["prefix_mask"]].tolist())
                         - set(shared["tokens"][shared["attention_mask"]].tolist()))
    assert prompt_only and float(jnp.abs(g_shared["embed"][np.asarray(prompt_only)]).min()) > 0


def test_old_logprob_pass_in_the_shared_layout(tiny, host_params, mesh1):
    rows, shared = _step_inputs(tiny, host_params, 4, micro=4)
    fn = ts.make_compute_logprobs(tiny, mesh1, 4, chunk_size=8)
    lp_rows, m_rows = fn(host_params, rows)
    lp_shared, m_shared = fn(host_params, shared)
    assert lp_shared.shape == shared["loss_mask"].shape
    np.testing.assert_allclose(m_shared["entropy"], m_rows["entropy"], rtol=1e-5)
    got = np.sort(np.asarray(lp_shared)[shared["loss_mask"]])
    want = np.sort(np.asarray(lp_rows)[rows["loss_mask"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_a_shared_batch_that_does_not_split_into_whole_blocks_is_refused(tiny, host_params, mesh1):
    _, shared = _step_inputs(tiny, host_params, 5, micro=4)
    fn = ts.make_compute_logprobs(tiny, mesh1, 6, chunk_size=8)
    with pytest.raises(ValueError, match="whole blocks"):
        fn(host_params, shared)


def test_train_step_moves_the_same_params_in_both_layouts(tiny, host_params, mesh1):
    loss_cfg = ts.LossConfig(chunk_size=8)
    optim = ts.OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-4)
    step = ts.make_train_step(tiny, loss_cfg, optim, mesh1, 4)
    rows, shared = _step_inputs(tiny, host_params, 6, micro=4)
    out = {}
    for name, batch in (("rows", rows), ("shared", shared)):
        state = ts.create_train_state(tiny, host_params, optim, mesh1)
        state, m = step(state, batch)
        out[name] = (jax.device_get(state.params), jax.device_get(m))
    np.testing.assert_allclose(out["shared"][1]["grad_norm"], out["rows"][1]["grad_norm"], rtol=1e-5)
    assert out["shared"][1]["num_tokens"] == out["rows"][1]["num_tokens"]
    assert out["shared"][1]["num_seqs"] == out["rows"][1]["num_seqs"]
    for a, b, p0 in zip(jax.tree.leaves(out["shared"][0]), jax.tree.leaves(out["rows"][0]),
                        jax.tree.leaves(host_params)):
        np.testing.assert_allclose(a - p0, b - p0, atol=2e-6, rtol=1e-3)
