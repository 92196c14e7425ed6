"""Exact-number tests of the losses: GRPO policy loss and its variants, KL, DPO, SFT, GAE, GRPOConfig."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from grpo_jax.algorithms import (
    GRPOConfig,
    dapo_config,
    dpo_loss,
    dr_grpo_config,
    gae_advantages,
    gspo_config,
    kl_divergence,
    policy_loss,
    ppo_token_rewards,
    sft_loss,
    value_loss,
)

LOG = math.log


def _loss(lp, old, adv, mask, ref=None, **kw):
    kw = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0, "loss_agg": "seq_mean_token_mean"} | kw
    return policy_loss(
        jnp.asarray(lp, jnp.float32),
        jnp.asarray(old, jnp.float32),
        None if ref is None else jnp.asarray(ref, jnp.float32),
        jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask, jnp.float32),
        **kw,
    )


def _grad(lp, old, adv, mask, **kw):
    return jax.grad(lambda x: _loss(x, old, adv, mask, **kw)[0])(jnp.asarray(lp, jnp.float32))


# ---------------------------------------------------------------- clipping, one token at a time


def test_clip_high_active():
    loss, m = _loss([[LOG(1.5)]], [[0.0]], [1.0], [[1.0]])
    np.testing.assert_allclose(loss, -1.28, rtol=1e-6)  # min(1.5·1, 1.28·1)
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (1.0, 1.0, 0.0)
    assert _grad([[LOG(1.5)]], [[0.0]], [1.0], [[1.0]])[0, 0] == 0.0


def test_clip_low_active():
    loss, m = _loss([[LOG(0.5)]], [[0.0]], [-1.0], [[1.0]])
    np.testing.assert_allclose(loss, 0.8, rtol=1e-6)  # −min(−0.5, −0.8)
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (1.0, 0.0, 1.0)
    assert _grad([[LOG(0.5)]], [[0.0]], [-1.0], [[1.0]])[0, 0] == 0.0


def test_unclipped_side_keeps_gradient():
    loss, m = _loss([[LOG(0.5)]], [[0.0]], [1.0], [[1.0]])
    np.testing.assert_allclose(loss, -0.5, rtol=1e-6)  # min(0.5, 0.8): the ratio term, not clipped
    assert m["clip_frac"] == 0.0
    np.testing.assert_allclose(_grad([[LOG(0.5)]], [[0.0]], [1.0], [[1.0]]), [[-0.5]], rtol=1e-6)


def test_dual_clip_bounds_negative_advantages():
    args = ([[LOG(5.0)]], [[0.0]], [-1.0], [[1.0]])
    np.testing.assert_allclose(_loss(*args)[0], 5.0, rtol=1e-6)
    loss, m = _loss(*args, dual_clip_c=3.0)
    np.testing.assert_allclose(loss, 3.0, rtol=1e-6)  # max(min(−5, −1.2), 3·(−1)) = −3
    assert m["dual_clip_frac"] == 1.0
    assert _grad(*args, dual_clip_c=3.0)[0, 0] == 0.0
    # Positive advantages are untouched by the dual clip.
    np.testing.assert_allclose(_loss([[LOG(5.0)]], [[0.0]], [1.0], [[1.0]], dual_clip_c=3.0)[0], -1.28)
    with pytest.raises(ValueError, match="dual_clip_c"):
        _loss(*args, dual_clip_c=1.0)


def test_fresh_old_policy_ratio_one_no_clipping():
    lp = np.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    adv = np.array([2.0, -1.0], np.float32)
    loss, m = _loss(lp, lp, adv, mask)
    np.testing.assert_allclose(loss, -(2.0 - 1.0) / 2, rtol=1e-6)
    assert (m["clip_frac"], m["clip_frac_low"], m["clip_frac_high"]) == (0.0, 0.0, 0.0)
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"]) == (1.0, 1.0, 1.0)
    # d loss / d lp_{i,t} = −A_i / (|o_i| · N) on real tokens.
    expected = [[-2 / 6, -2 / 6, -2 / 6], [1 / 4, 1 / 4, 0.0]]
    np.testing.assert_allclose(_grad(lp, lp, adv, mask), expected, rtol=1e-6)


# ---------------------------------------------------------------- aggregation and weights

# Fresh π_old and per-token advantages: the per-token loss is −A, so every aggregate is plain arithmetic.
AGG_ADV = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
AGG_MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)


@pytest.mark.parametrize(
    "loss_agg, kw, expected",
    [
        ("seq_mean_token_mean", {}, -(1.5 + 5.0) / 2),
        ("token_mean", {}, -18.0 / 5),
        ("seq_mean_token_sum_norm", {}, -(3.0 / 3 + 15.0 / 3) / 2),  # default normaliser T = 3
        ("seq_mean_token_sum_norm", {"max_len_norm": 4}, -(3.0 / 4 + 15.0 / 4) / 2),
        ("seq_mean_token_mean", {"sample_weight": [0.0, 1.0]}, -5.0),
        ("token_mean", {"sample_weight": [0.0, 1.0]}, -5.0),
        ("seq_mean_token_sum_norm", {"sample_weight": [0.0, 1.0]}, -5.0),
        ("seq_mean_token_mean", {"sample_weight": [2.0, 1.0]}, -(2 * 1.5 + 5.0) / 3),
        ("token_mean", {"sample_weight": [2.0, 1.0]}, -(2 * 3.0 + 15.0) / 7),
    ],
)
def test_loss_aggregations(loss_agg, kw, expected):
    if "sample_weight" in kw:
        kw = kw | {"sample_weight": jnp.asarray(kw["sample_weight"])}
    lp = np.zeros((2, 3), np.float32)
    loss, m = _loss(lp, lp, AGG_ADV, AGG_MASK, loss_agg=loss_agg, **kw)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["pg_loss"], expected, rtol=1e-6)


def test_unknown_loss_agg_raises():
    with pytest.raises(ValueError, match="unknown loss_agg 'mean'"):
        _loss([[0.0]], [[0.0]], [1.0], [[1.0]], loss_agg="mean")


def test_masked_tokens_are_ignored_even_if_inf_or_nan():
    lp = np.array([[-1.0, -0.5, np.nan], [-2.0, -np.inf, -np.inf]], np.float32)
    old = np.array([[-1.2, -0.4, -np.inf], [-1.5, np.nan, -np.inf]], np.float32)
    ref = np.array([[-0.9, -0.6, -np.inf], [-2.5, -np.inf, np.nan]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    kw = {"kl_coef": 0.1, "loss_agg": "token_mean"}
    loss, metrics = _loss(lp, old, adv, mask, ref=ref, **kw)
    truncated, _ = _loss(
        [[-1.0, -0.5, -2.0]],
        [[-1.2, -0.4, -1.5]],
        [[1.0, 1.0, -1.0]],
        [[1, 1, 1]],
        ref=[[-0.9, -0.6, -2.5]],
        **kw,
    )
    np.testing.assert_allclose(loss, truncated, rtol=1e-6)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: _loss(x, old, adv, mask, ref=ref, **kw)[0])(jnp.asarray(lp))
    assert np.all(np.isfinite(grad)) and grad[0, 2] == 0 and grad[1, 1] == 0 and grad[1, 2] == 0


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_zero_mask_rows_give_no_nan(loss_agg, ratio_level):
    lp = np.array([[-1.0, -2.0], [np.nan, -np.inf]], np.float32)
    old = np.array([[-1.1, -1.9], [-1.0, np.nan]], np.float32)
    kw = {"loss_agg": loss_agg, "ratio_level": ratio_level, "kl_coef": 0.04}
    full, _ = _loss(lp, old, [1.0, 1.0], [[1, 1], [0, 0]], ref=old, **kw)
    alone, _ = _loss(lp[:1], old[:1], [1.0], [[1, 1]], ref=old[:1], **kw)
    np.testing.assert_allclose(full, alone, rtol=1e-6)
    loss, metrics = _loss(lp, old, [1.0, 1.0], np.zeros((2, 2)), ref=old, **kw)
    assert loss == 0.0 and all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: _loss(x, old, [1.0, 1.0], np.zeros((2, 2)), ref=old, **kw)[0])(jnp.asarray(lp))
    assert np.array_equal(grad, np.zeros((2, 2)))


# ---------------------------------------------------------------- KL, entropy


def test_kl_estimators_exact():
    lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    np.testing.assert_allclose(kl_divergence("k1", lp, ref), [LOG(2)], rtol=1e-6)
    np.testing.assert_allclose(kl_divergence("k2", lp, ref), [0.5 * LOG(2) ** 2], rtol=1e-6)
    np.testing.assert_allclose(
        kl_divergence("k3", lp, ref), [0.5 + LOG(2) - 1], rtol=1e-6
    )  # ref/π − log(ref/π) − 1
    assert kl_divergence("k3", lp, lp)[0] == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_divergence("k4", lp, ref)


def test_kl_penalty_enters_loss_and_metric():
    lp, ref = [[LOG(0.5), LOG(0.5)]], [[LOG(0.25), LOG(0.5)]]
    loss, m = _loss(lp, lp, [1.0], [[1, 1]], ref=ref, kl_coef=0.1)
    k3 = 0.5 + LOG(2) - 1
    np.testing.assert_allclose(m["kl"], k3 / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, -1.0 + 0.1 * k3 / 2, rtol=1e-6)
    _, m1 = _loss(lp, lp, [1.0], [[1, 1]], ref=ref, kl_coef=0.1, kl_estimator="k1")
    np.testing.assert_allclose(m1["kl"], LOG(2) / 2, rtol=1e-6)
    # d/dlp of β·k3 = β·(1 − ref/π): 0.1 · 0.5 / 2 tokens on the first token.
    grad = _grad(lp, lp, [1.0], [[1, 1]], ref=ref, kl_coef=0.1)
    np.testing.assert_allclose(grad, [[-0.5 + 0.025, -0.5]], rtol=1e-6)


def test_kl_coef_zero_needs_no_reference():
    loss, m = _loss([[-1.0]], [[-1.0]], [1.0], [[1.0]], ref=None, kl_coef=0.0)
    assert m["kl"] == 0.0 and loss == -1.0
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        _loss([[-1.0]], [[-1.0]], [1.0], [[1.0]], ref=None, kl_coef=0.04)


def test_entropy_bonus():
    lp = np.zeros((1, 2), np.float32)
    entropy = jnp.array([[1.0, 3.0]])
    loss, m = _loss(lp, lp, [1.0], [[1, 1]], entropy=entropy, entropy_coef=0.1)
    np.testing.assert_allclose(loss, -1.0 - 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(m["entropy"], 2.0)
    with pytest.raises(ValueError, match="entropy is None"):
        _loss(lp, lp, [1.0], [[1, 1]], entropy_coef=0.1)


# ---------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_clipped_per_sequence():
    lp = np.array([[LOG(1.1), LOG(1.3), 0.0], [LOG(0.8), LOG(0.9), -7.0]], np.float32)
    old = np.zeros_like(lp)
    mask = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
    kw = {"ratio_level": "sequence", "clip_eps_low": 0.1, "clip_eps_high": 0.1}
    loss, m = _loss(lp, old, [1.0, 1.0], mask, **kw)
    s0, s1 = math.sqrt(1.1 * 1.3), math.sqrt(0.8 * 0.9)  # geometric means 1.196 (clipped to 1.1), 0.849
    np.testing.assert_allclose(loss, -(1.1 + s1) / 2, rtol=1e-6)
    np.testing.assert_allclose([m["ratio_max"], m["ratio_min"]], [s0, s1], rtol=1e-6)
    assert m["clip_frac_high"] == 0.5
    # Sequence 0 is clipped: no gradient. Sequence 1: d(−s1/2)/dlp_t = −s1 / 2 · 1/2.
    np.testing.assert_allclose(
        _grad(lp, old, [1.0, 1.0], mask, **kw), [[0, 0, 0], [-s1 / 4, -s1 / 4, 0]], rtol=1e-6
    )


def test_gspo_gradient_matches_plain_sequence_ratio():
    # With per-sequence advantages the GSPO-token form must give the plain GSPO objective's gradient.
    rng = np.random.default_rng(0)
    lp = rng.normal(-1.0, 0.1, (3, 4)).astype(np.float32)
    old = (lp + rng.normal(0, 0.02, lp.shape)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    adv = np.array([1.0, -0.5, 2.0], np.float32)

    def plain(x):
        s = jnp.exp(jnp.sum((x - old) * mask, 1) / mask.sum(1))
        return -jnp.mean(jnp.minimum(s * adv, jnp.clip(s, 0.9, 1.1) * adv))

    for loss_agg in ["seq_mean_token_mean", "token_mean"]:
        got = _grad(
            lp, old, adv, mask, ratio_level="sequence", clip_eps_low=0.1, clip_eps_high=0.1, loss_agg=loss_agg
        )
        if loss_agg == "seq_mean_token_mean":
            np.testing.assert_allclose(got, jax.grad(plain)(jnp.asarray(lp)), rtol=1e-5, atol=1e-7)
        assert np.array_equal(got == 0, mask == 0)


# ---------------------------------------------------------------- against a NumPy reference


def _reference_policy_loss(lp, old, ref, adv, mask, eps_low, eps_high, beta, loss_agg, dual_c, weight, norm):
    """Loops over sequences and tokens in float64, written from the paper formulas."""
    n, t = lp.shape
    token_losses = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if mask[i, j] == 0:
                continue
            r = math.exp(lp[i, j] - old[i, j])
            a = adv[i]
            obj = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if dual_c is not None and a < 0:
                obj = max(obj, dual_c * a)
            d = ref[i, j] - lp[i, j]
            token_losses[i, j] = -obj + beta * (math.exp(d) - d - 1)
    lengths = mask.sum(1)
    if loss_agg == "token_mean":
        return sum(weight[i] * token_losses[i].sum() for i in range(n)) / sum(
            weight[i] * lengths[i] for i in range(n)
        )
    per_seq = [
        token_losses[i].sum() / (lengths[i] if loss_agg == "seq_mean_token_mean" else norm) for i in range(n)
    ]
    return sum(weight[i] * per_seq[i] for i in range(n)) / sum(weight)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("dual_c", [None, 1.5])
def test_matches_numpy_reference(loss_agg, dual_c):
    rng = np.random.default_rng(1)
    n, t = 4, 5
    lp = rng.normal(-1.5, 0.5, (n, t)).astype(np.float32)
    old = (lp + rng.normal(0, 0.4, (n, t))).astype(np.float32)  # ratios well outside [0.8, 1.28]
    ref = (lp + rng.normal(0, 0.3, (n, t))).astype(np.float32)
    adv = np.array([1.3, -0.7, 0.4, -1.9], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    weight = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    loss, m = _loss(
        lp,
        old,
        adv,
        mask,
        ref=ref,
        kl_coef=0.04,
        loss_agg=loss_agg,
        dual_clip_c=dual_c,
        sample_weight=jnp.asarray(weight),
        max_len_norm=6,
    )
    expected = _reference_policy_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, loss_agg, dual_c, weight, 6)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < m["clip_frac"] < 1
    np.testing.assert_allclose(m["clip_frac"], m["clip_frac_low"] + m["clip_frac_high"], rtol=1e-6)


def test_jit_matches_eager():
    rng = np.random.default_rng(2)
    lp = rng.normal(-1.0, 0.3, (4, 6)).astype(np.float32)
    old = (lp + rng.normal(0, 0.3, lp.shape)).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.8).astype(np.float32)
    adv = rng.normal(size=4).astype(np.float32)
    entropy = rng.random((4, 6)).astype(np.float32)
    kw = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        kl_coef=0.04,
        loss_agg="token_mean",
        dual_clip_c=3.0,
        entropy_coef=0.01,
    )
    fn = lambda lp, old, ref, adv, mask, ent: policy_loss(lp, old, ref, adv, mask, entropy=ent, **kw)
    args = tuple(map(jnp.asarray, (lp, old, old[::-1], adv, mask, entropy)))
    eager_loss, eager_metrics = fn(*args)
    jit_loss, jit_metrics = jax.jit(fn)(*args)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6, err_msg=key)


# ---------------------------------------------------------------- DPO, SFT


def test_dpo_exact_numbers():
    pc, pr = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
    rc, rr = jnp.array([-1.5, -2.0]), jnp.array([-1.5, -2.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margins β·[(0.5) − (−0.5)] = 0.5 and β·[(−1) − (1)] = −1.
    expected = (LOG(1 + math.exp(-0.5)) + LOG(1 + math.exp(1.0))) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose([m["reward_accuracy"], m["reward_margin"]], [0.5, -0.25], rtol=1e-6)
    np.testing.assert_allclose([m["reward_chosen"], m["reward_rejected"]], [-0.125, 0.125], rtol=1e-6)
    smoothed, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(
        smoothed, 0.9 * LOG(1 + math.exp(-0.5)) + 0.1 * LOG(1 + math.exp(0.5)), rtol=1e-6
    )
    grad = jax.grad(lambda x: dpo_loss(x, pr, rc, rr, beta=0.5)[0])(pc)
    np.testing.assert_allclose(
        grad, [-0.5 * (1 - 1 / (1 + math.exp(-0.5))) / 2, -0.5 * (1 - 1 / (1 + math.exp(1.0))) / 2], rtol=1e-5
    )


def test_sft_token_mean_nll():
    lp = jnp.array([[-1.0, -2.0, jnp.nan], [-3.0, -jnp.inf, -jnp.inf]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    loss, m = sft_loss(lp, mask)
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
    np.testing.assert_allclose(m["perplexity"], math.exp(2.0), rtol=1e-6)
    assert m["num_tokens"] == 3
    grad = jax.grad(lambda x: sft_loss(x, mask)[0])(lp)
    np.testing.assert_allclose(grad, [[-1 / 3, -1 / 3, 0], [-1 / 3, 0, 0]], rtol=1e-6)
    assert sft_loss(lp, jnp.zeros_like(mask))[0] == 0.0


# ---------------------------------------------------------------- PPO critic side


def _reference_gae(rewards, values, lengths, gamma, lam):
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for i, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            running = delta + gamma * lam * running
            advantages[i, t] = running
    return advantages


def test_gae_matches_numpy_loop():
    rng = np.random.default_rng(3)
    lengths = [6, 3, 0, 1]
    mask = (np.arange(6)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    expected = _reference_gae(rewards, values, lengths, 0.99, 0.95)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, (expected + values) * mask, rtol=1e-5, atol=1e-6)
    jitted, _ = jax.jit(lambda r, v, m: gae_advantages(r, v, m, gamma=0.99, lam=0.95))(rewards, values, mask)
    np.testing.assert_allclose(jitted, advantages, rtol=1e-6, atol=1e-7)


def test_gae_gamma_lambda_one_is_return_minus_value():
    rewards = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.75, 9.0]], np.float32)
    advantages, returns = gae_advantages(rewards, values, [[1, 1, 1, 0]], gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages, [[0.5, 0.75, 0.25, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0, 0.0]], rtol=1e-6)


def test_gae_carries_values_across_observation_tokens():
    """A multi-turn row: tokens 2-3 are an observation (loss mask 0) between the policy's tokens 0-1 and 4.
    By hand, γ = 0.9, λ = 0.5: token 4 is terminal, Â4 = 1 − 0.75 = 0.25; token 1's next real token is 4:
    δ1 = 0.9·0.75 − 0.25 = 0.425, Â1 = 0.425 + 0.45·0.25 = 0.5375; δ0 = 0.9·0.25 − 0.5 = −0.275,
    Â0 = −0.275 + 0.45·0.5375 = −0.033125. (Ending the row at the hole would give Â1 = −0.25.)"""
    rewards = np.array([[0.0, 0.0, 9.0, 9.0, 1.0]], np.float32)
    values = np.array([[0.5, 0.25, 7.0, 7.0, 0.75]], np.float32)
    advantages, returns = gae_advantages(rewards, values, [[1, 1, 0, 0, 1]], gamma=0.9, lam=0.5)
    np.testing.assert_allclose(advantages, [[-0.033125, 0.5375, 0.0, 0.0, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[0.466875, 0.7875, 0.0, 0.0, 1.0]], rtol=1e-6)


def test_ppo_token_rewards():
    kl = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    got = ppo_token_rewards(jnp.array([1.0, -1.0, 5.0]), kl, mask, kl_coef=0.5)
    np.testing.assert_allclose(
        got, [[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 - 1.0], [0, 0, 0]], rtol=1e-6
    )


def test_value_loss_clipping():
    values, old = jnp.array([[2.0, 1.2, 7.0]]), jnp.array([[1.0, 1.0, 0.0]])
    returns, mask = jnp.array([[3.0, 3.0, 0.0]]), jnp.array([[1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, clip_eps=0.5)
    # token 0: max((2−3)², (1.5−3)²) = 2.25 (clipped); token 1: (1.2−3)² = 3.24 both ways.
    np.testing.assert_allclose(loss, 0.5 * (2.25 + 3.24) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["vf_clip_frac"], 0.5)
    unclipped, _ = value_loss(values, old, returns, mask, clip_eps=None)
    np.testing.assert_allclose(unclipped, 0.5 * (1.0 + 3.24) / 2, rtol=1e-6)


def test_value_inside_the_clip_band_is_not_counted_as_clipped():
    """V inside [V_old − ε, V_old + ε]: the clipped value is V itself, so the token is not clipped. As
    V_old + clip(V − V_old, ±ε) it rounds one ulp off V for these float32 numbers and was counted."""
    values, old = jnp.array([[-0.031837113]], jnp.float32), jnp.array([[-0.2314137]], jnp.float32)
    assert float(old[0, 0] + jnp.clip(values - old, -0.2, 0.2)[0, 0]) != float(values[0, 0])
    for returns in (jnp.array([[0.5]]), jnp.array([[-0.5]])):
        loss, m = value_loss(values, old, returns, jnp.array([[1]]), clip_eps=0.2)
        assert float(m["vf_clip_frac"]) == 0.0
        np.testing.assert_allclose(loss, 0.5 * float((values - returns)[0, 0]) ** 2, rtol=1e-6)


# ---------------------------------------------------------------- GRPOConfig


def test_config_defaults_are_paper_values():
    config = GRPOConfig()
    assert (config.kl_coef, config.clip_eps_low, config.clip_eps_high, config.num_iterations) == (
        0.04,
        0.2,
        0.2,
        1,
    )
    assert config.num_generations == 8 and config.loss_kl_coef == 0.04
    assert config.advantage_kwargs == {"eps": 1e-6, "scale": "group"}
    assert GRPOConfig(kl_in_reward=True).loss_kl_coef == 0.0
    assert GRPOConfig(advantage_estimator="rloo").advantage_kwargs == {"eps": 1e-6}


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_generations", 0),
        ("num_generations", 2.5),
        ("kl_coef", -0.1),
        ("clip_eps_low", 1.5),
        ("clip_eps_high", 0.0),
        ("num_iterations", 0),
        ("advantage_estimator", "ppo"),
        ("advantage_scale", "global"),
        ("loss_agg", "sum"),
        ("kl_estimator", "k4"),
        ("kl_in_reward", 1),
        ("ratio_level", "chunk"),
        ("dual_clip_c", 0.9),
        ("max_len_norm", 0),
        ("mask_truncated", 1),
        ("loss_type", "ppo"),
        ("entropy_mask_top", 0.0),
        ("entropy_mask_top", 1.5),
        ("is_correction", "tis"),
        ("is_cap", 0.5),
        ("is_mask_low", 1.5),
        ("is_mask_high", 0.5),
        ("reference_reset_every", -1),
        ("temperature", 0.0),
        ("temperature", float("nan")),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"GRPOConfig\.{field} must be .*got {value!r}"):
        GRPOConfig(**{field: value})


def test_config_cross_field_checks():
    with pytest.raises(ValueError, match="GRPOConfig.num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    assert GRPOConfig(num_generations=1, advantage_estimator="reinforce_pp").num_generations == 1
    with pytest.raises(ValueError, match="GRPOConfig.advantage_scale"):
        GRPOConfig(advantage_estimator="rloo", advantage_scale="batch")


def test_config_from_dict():
    config = GRPOConfig.from_dict(ml_collections.ConfigDict({"kl_coef": 0.001, "num_generations": 16}))
    assert (config.kl_coef, config.num_generations) == (0.001, 16)
    assert GRPOConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GRPOConfig key\\(s\\): beta, clip_eps"):
        GRPOConfig.from_dict({"beta": 0.1, "clip_eps": 0.2, "kl_coef": 0.0})


def test_presets():
    dapo = dapo_config()
    assert (dapo.clip_eps_low, dapo.clip_eps_high, dapo.kl_coef, dapo.loss_agg) == (
        0.2,
        0.28,
        0.0,
        "token_mean",
    )
    assert dapo.dynamic_sampling and dapo_config(num_generations=4).num_generations == 4
    dr = dr_grpo_config(max_len_norm=512)
    assert (dr.advantage_estimator, dr.loss_agg, dr.kl_coef, dr.max_len_norm) == (
        "dr_grpo",
        "seq_mean_token_sum_norm",
        0.0,
        512,
    )
    gspo = gspo_config()
    assert (gspo.ratio_level, gspo.clip_eps_low, gspo.clip_eps_high) == ("sequence", 3e-4, 4e-4)
