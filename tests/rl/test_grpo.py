"""grpo: advantages on hand-computed groups, the policy loss against a NumPy transcription of the formula,
its gradient against finite differences, the KL estimators and the registries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax.rl import grpo

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
CLIPS = ((0.2, 0.28, 10.0), (0.2, 0.2, None), (0.1, 0.5, 3.0))


# ----------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_cases():
    rewards = np.array([
        [1.0, 1.0, 1.0, 1.0],     # all right: no signal
        [1 / 3, 1 / 3, 1 / 3, 1 / 3],  # equal non-dyadic meta rewards: exactly 0, not ulp / eps
        [1.0, 0.0, 0.0, 0.0],     # one success: mean 1/4, std (ddof=1) = 1/2
        [0.0, 1.0, 0.5, 0.5],     # mean 1/2, std = sqrt(0.5 / 3)
    ], np.float32)
    adv = np.asarray(grpo.group_advantages(rewards, eps=1e-6))
    np.testing.assert_array_equal(adv[:2], 0.0)
    np.testing.assert_allclose(adv[2], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6), rtol=1e-6)
    s = np.sqrt(0.5 / 3)
    np.testing.assert_allclose(adv[3], np.array([-0.5, 0.5, 0.0, 0.0]) / (s + 1e-6), rtol=1e-6, atol=1e-7)
    assert adv.dtype == np.float32 and adv.shape == (4, 4)


def test_group_advantages_ragged_groups():
    rewards = np.array([[1.0, 0.0, 7.0, 7.0],
                        [1.0, 5.0, 5.0, 5.0],     # one rollout present: a group of one gets 0
                        [0.3, 0.9, 0.1, 0.2]],    # gated problem: no solution group at all
                       np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    adv = np.asarray(grpo.group_advantages(rewards, mask=mask))
    # mean 0.5, std sqrt((0.25 + 0.25) / 1); masked entries exactly 0 whatever their reward.
    np.testing.assert_allclose(adv[0], [0.5 / (np.sqrt(0.5) + 1e-6), -0.5 / (np.sqrt(0.5) + 1e-6), 0, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(adv[1:], 0.0)
    # Unmasked form equals the masked one with an all-True mask.
    full = np.asarray(grpo.group_advantages(rewards))
    np.testing.assert_array_equal(full, np.asarray(grpo.group_advantages(rewards, mask=np.ones((3, 4), bool))))


def test_other_estimators_hand_cases():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    np.testing.assert_allclose(grpo.get_advantage_estimator("dr_grpo")(rewards),
                               [[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0]], atol=1e-7)
    # RLOO: r_i minus the mean of the others.
    np.testing.assert_allclose(grpo.get_advantage_estimator("rloo")(rewards),
                               [[1.0, -1 / 3, -1 / 3, -1 / 3], [0, 0, 0, 0]], atol=1e-6)
    ragged = grpo.get_advantage_estimator("rloo")(np.array([[1.0, 0.0, 9.0]], np.float32),
                                                  mask=np.array([[1, 1, 0]], bool))
    np.testing.assert_allclose(ragged, [[1.0, -1.0, 0.0]], atol=1e-6)
    assert grpo.get_advantage_estimator("grpo") is grpo.group_advantages
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        grpo.get_advantage_estimator("ppo")


# ----------------------------------------------------------------------------------- policy loss


def np_policy_loss(logp, old, adv, mask, clip_low, clip_high, clip_c, agg):
    """The formula of docs/method.md §3, in float64, one step at a time."""
    logp, old = logp.astype(np.float64), old.astype(np.float64)
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape).astype(np.float64)
    ratio = np.exp(np.clip(logp - old, -20, 20))
    per_tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high))
    if clip_c is not None:
        per_tok = np.where(adv < 0, np.minimum(per_tok, -adv * clip_c), per_tok)
    m = mask.astype(np.float64)
    if agg == "token-mean":
        return (per_tok * m).sum() / m.sum()
    rows = [i for i in range(len(m)) if m[i].sum() > 0]   # padding rows are not sequences
    if agg == "seq-mean-token-mean":
        return np.mean([(per_tok[i] * m[i]).sum() / m[i].sum() for i in rows])
    return np.mean([(per_tok[i] * m[i]).sum() for i in rows])


def random_inputs(seed, n=6, t=12, per_token_adv=False):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(2.0, (n, t)).astype(np.float32)
    # log-ratio std 1.2: ratios from ~0.03 to ~30, so every clip region (and the dual clip) is hit.
    logp = (old + 1.2 * rng.normal(size=(n, t))).astype(np.float32)
    adv = rng.normal(size=(n, t) if per_token_adv else (n,)).astype(np.float32)
    mask = np.zeros((n, t), bool)
    for i, (a, b) in enumerate(zip(rng.integers(1, 5, n), rng.integers(6, t + 1, n))):
        mask[i, a:b] = True
    mask[-1] = False  # a padding row
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_matches_numpy(agg, clip, per_token_adv):
    logp, old, adv, mask = random_inputs(10 * AGGS.index(agg) + 2 * CLIPS.index(clip) + per_token_adv,
                                     per_token_adv=per_token_adv)
    loss, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                     *clip, agg=agg)
    expected = np_policy_loss(logp, old, adv, mask, *clip, agg)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)
    assert float(metrics["pg_loss"]) == float(loss)

    clip_low, clip_high, clip_c = clip
    a = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    r = np.exp(logp.astype(np.float64) - old)
    mean = lambda x: x[mask].mean()
    low, high = (a < 0) & (r < 1 - clip_low), (a > 0) & (r > 1 + clip_high)
    np.testing.assert_allclose(float(metrics["clip_fraction_low"]), mean(low), atol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_fraction_high"]), mean(high), atol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), mean(low | high), atol=1e-6)
    dual = mean((a < 0) & (r > clip_c)) if clip_c is not None else 0.0
    np.testing.assert_allclose(float(metrics["clip_fraction_dual"]), dual, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), mean(r), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_max"]), r[mask].max(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_min"]), r[mask].min(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["approx_kl"]), mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ppo_kl"]), mean(old - logp.astype(np.float64)), rtol=1e-5)


def test_policy_loss_regions_hit():
    """The random inputs really exercise every branch, so the comparison above means something."""
    logp, old, adv, mask = random_inputs(0)
    _, m = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    assert all(float(m[f"clip_fraction_{k}"]) > 0 for k in ("low", "high", "dual"))
    assert 0 < float(m["clip_fraction"]) < 1


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_gradient_matches_finite_differences(agg):
    logp, old, adv, mask = random_inputs(7, n=4, t=8)
    with jax.enable_x64(True):
        old64, adv64, mask64 = (jnp.asarray(x, jnp.float64) for x in (old, adv, mask))
        f = jax.jit(lambda lp: grpo.policy_loss(lp, old64, adv64, mask64, agg=agg)[0])
        x = np.asarray(logp, np.float64)
        grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
        h = 1e-6
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            up, dn = x.copy(), x.copy()
            up[idx] += h
            dn[idx] -= h
            fd[idx] = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(dn)))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    assert np.all(grad[~mask] == 0)
    assert np.count_nonzero(grad[mask]) > 0 and np.count_nonzero(grad[mask]) < mask.sum()  # some clipped


@pytest.mark.parametrize("agg", AGGS)
def test_global_normalisers_make_halves_add_up(agg):
    """Loss and metrics of two halves, each normalised by the whole batch's counts, sum to the whole."""
    logp, old, adv, mask = (jnp.asarray(x) for x in random_inputs(3, n=8))
    num_tokens, num_seqs = grpo.batch_counts(mask)
    full, fm = grpo.policy_loss(logp, old, adv, mask, agg=agg)
    parts = [grpo.policy_loss(logp[s], old[s], adv[s], mask[s], agg=agg, num_tokens=num_tokens,
                              num_seqs=num_seqs) for s in (slice(0, 3), slice(3, 8))]
    np.testing.assert_allclose(float(parts[0][0] + parts[1][0]), float(full), rtol=1e-6)
    for key in ("clip_fraction", "approx_kl", "ratio_mean"):
        np.testing.assert_allclose(float(parts[0][1][key] + parts[1][1][key]), float(fm[key]), rtol=1e-6)
    assert float(jnp.maximum(parts[0][1]["ratio_max"], parts[1][1]["ratio_max"])) == float(fm["ratio_max"])


def test_entropy_metric_and_errors():
    logp, old, adv, mask = (jnp.asarray(x) for x in random_inputs(1))
    ent = jnp.arange(logp.size, dtype=jnp.float32).reshape(logp.shape)
    _, m = grpo.policy_loss(logp, old, adv, mask, entropy=ent)
    np.testing.assert_allclose(float(m["entropy"]), np.asarray(ent)[np.asarray(mask)].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        grpo.policy_loss(logp, old, adv, mask, agg="seq-sum")
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        grpo.policy_loss(logp, old, adv, mask, clip_c=0.5)


def test_batch_counts_ignore_padding_rows():
    mask = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]], bool)
    nt, ns = grpo.batch_counts(mask)
    assert (float(nt), float(ns)) == (3.0, 2.0)
    assert tuple(map(float, grpo.batch_counts(np.zeros((2, 3), bool)))) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------- KL


def test_kl_estimators():
    rng = np.random.default_rng(0)
    logp = -rng.exponential(1.0, (3, 5)).astype(np.float32)
    ref = (logp + 0.5 * rng.normal(size=(3, 5))).astype(np.float32)
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1"), logp - ref, rtol=1e-6)
    d = ref.astype(np.float64) - logp
    k3 = np.clip(np.exp(d) - 1 - d, -10, 10)
    for name in ("k3", "low_var_kl", "low-var-kl"):
        np.testing.assert_allclose(grpo.kl_penalty(logp, ref, name), k3, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grpo.kl_penalty(logp, ref, "k3")) >= 0)
    # Clamp: a huge divergence stays at 10 instead of overflowing.
    assert float(grpo.kl_penalty(jnp.array([[-50.0]]), jnp.array([[-1.0]]), "k3")[0, 0]) == 10.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        grpo.kl_penalty(logp, ref, "k9")
