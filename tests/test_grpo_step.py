"""The one-program GRPO step: ratio/clip sanity, no wasted reference forward, one compile (with a
hand-computed clip fraction), sharded == single device (groups spanning devices), finite-difference
gradient, NaN loss and NaN gradient skips, dynamic sampling on and off, kl_in_reward against a numpy
step, HLO contents, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    grpo_loss,
    learning_rate_schedule,
    make_grpo_step,
    make_optimizer,
    reset_reference,
    rollout_to_batch,
)

CONFIG = tiny_model_config(vocab_size=32)
EOS = 1
TARGET = 7
MAX_NEW = 4


def contains_target(batch, params):
    hit = jnp.any((batch["completion_tokens"] == TARGET) & (batch["completion_mask"] > 0), axis=-1)
    reward = hit.astype(jnp.float32)
    return reward, {"contains": reward}


def first_of_each_group(batch, params):
    """Reward 1 for the first completion of each group of 4, else 0: every group has Â > 0 on its first
    row and Â < 0 on the other three, whatever was sampled."""
    n = batch["completion_mask"].shape[0]
    reward = (jnp.arange(n) % 4 == 0).astype(jnp.float32)
    return reward, {"first": reward}


def constant_reward(batch, params):
    """Reward 0 everywhere: every group has zero variance."""
    return jnp.zeros(batch["completion_mask"].shape[0], jnp.float32), {}


def _prompts(batch_size):
    tokens = np.tile(np.arange(3, 3 + 5, dtype=np.int32), (batch_size, 1)) + np.arange(batch_size)[:, None]
    mask = np.ones_like(tokens)
    mask[::2, :2] = 0
    return tokens, mask


def _setup(
    grpo,
    *,
    mesh=None,
    lr=1e-2,
    seed=0,
    with_reference=True,
    batch_size=4,
    adam_eps=1e-8,
    reward_fn=contains_target,
    warmup_steps=0,
    model_config=CONFIG,
    **step_kw,
):
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt_config = OptimizerConfig(learning_rate=lr, max_grad_norm=1.0, eps=adam_eps, warmup_steps=warmup_steps)
    optimizer = make_optimizer(opt_config)
    shardings = models.model_param_shardings(mesh, CONFIG)
    params = jax.device_put(tiny_params(CONFIG, seed=seed), shardings)
    state, state_sh = create_train_state(
        params, optimizer, mesh, shardings, rng=jax.random.key(seed), with_reference=with_reference
    )
    step = make_grpo_step(
        grpo,
        model_config,
        optimizer,
        reward_fn=reward_fn,
        mesh=mesh,
        state_shardings=state_sh,
        lr_schedule=learning_rate_schedule(opt_config),
        **step_kw,
    )
    tokens, mask = _prompts(batch_size)
    rollout = sampling.generate(
        CONFIG,
        tiny_params(CONFIG, seed=seed),
        tokens,
        mask,
        jax.random.key(seed + 1),
        num_samples=grpo.num_generations,
        max_new_tokens=MAX_NEW,
        temperature=grpo.temperature,
        eos_id=EOS,
    )
    batch = rollout_to_batch(rollout, {}, grpo.num_generations)
    return state, step, batch, mesh


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _with_reference(state, seed=5):
    """The state with a reference that differs from the policy (tiny_params(seed)), laid out like it."""
    ref = jax.tree_util.tree_map(
        lambda p, x: jax.device_put(x, p.sharding), state.params, tiny_params(CONFIG, seed=seed)
    )
    return state.replace(ref_params=ref)


def _moved(new, old) -> bool:
    differs = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), new, old)
    return any(jax.tree_util.tree_leaves(differs))


def _token_share(rows, tokens, num_minibatches):
    """Mean over minibatches (rows m, m+M, ...) of the share of their tokens that lie in `rows`."""
    return np.mean(
        [
            tokens[m::num_minibatches][rows[m::num_minibatches]].sum() / tokens[m::num_minibatches].sum()
            for m in range(num_minibatches)
        ]
    )


def test_fresh_policy_ratio_is_one_and_nothing_clips():
    state, step, batch, _ = _setup(GRPOConfig(num_generations=4, kl_coef=0.04))
    _, metrics = step(state, batch)
    assert float(metrics["clip_frac"]) == 0.0
    assert abs(float(metrics["ratio_max"]) - 1.0) < 1e-5
    assert float(metrics["sampler_logprob_diff"]) <= 1e-5
    assert float(metrics["kl"]) < 1e-6  # π_ref == π_θ at the start
    for key in (
        "reward/mean",
        "reward/std",
        "kl",
        "clip_frac",
        "entropy",
        "completion_len/mean",
        "truncated_frac",
        "loss",
        "grad_norm",
        "learning_rate",
        "zero_variance_frac",
        "reward/contains",
    ):
        assert np.isfinite(float(metrics[key])), key


def test_zero_kl_never_evaluates_the_reference():
    # The state holds no reference at all: any reference forward would fail to trace.
    state, step, batch, _ = _setup(GRPOConfig(num_generations=4, kl_coef=0.0), with_reference=False)
    new_state, metrics = step(state, batch)
    assert new_state.ref_params is None and float(metrics["kl"]) == 0.0
    with_kl = _setup(GRPOConfig(num_generations=4, kl_coef=0.1))
    text_kl = with_kl[1].lower(with_kl[0], with_kl[2]).as_text(debug_info=True)
    text_no_kl = step.lower(new_state, batch).as_text(debug_info=True)
    assert "reference_logprobs" in text_kl and "reference_logprobs" not in text_no_kl


def test_step_is_one_program_with_rewards_advantages_loss_and_optimizer():
    state, step, batch, _ = _setup(GRPOConfig(num_generations=4))
    hlo = step.lower(state, batch).as_text(debug_info=True)
    for scope in ("rewards", "advantages", "policy_loss", "optimizer", "reference_logprobs"):
        assert scope in hlo, scope
    assert hlo.count("func.func public @main") == 1


def test_step_compiles_once_and_reference_reset_does_not_recompile():
    G, M = 4, 2
    grpo = GRPOConfig(num_generations=G, num_iterations=2, num_minibatches=M)
    # lr 1e-4: 12 updates drift the policy's logprobs far less than the clip range (ε = 0.2).
    state, step, batch, _ = _setup(grpo, lr=1e-4, reward_fn=first_of_each_group)
    # Push the ratio of group 0's tokens out of the clip range in the direction of their advantage
    # (log r = +2 where Â > 0, -2 where Â < 0); the other groups keep r ~ 1. So exactly group 0's tokens
    # clip, a hand-computable share of each minibatch.
    mask = np.asarray(batch["completion_mask"]) > 0
    n = mask.shape[0]
    rows = np.arange(n)
    sign = np.where(rows % G == 0, 1.0, -1.0)  # the sign of Â under first_of_each_group
    pushed = rows < G
    old = np.asarray(batch["old_logprobs"]) - 2.0 * np.where(pushed, sign, 0.0)[:, None] * mask
    batch = dict(batch, old_logprobs=jnp.asarray(old))
    tokens = mask.sum(axis=1)
    high = _token_share(pushed & (sign > 0), tokens, M)
    low = _token_share(pushed & (sign < 0), tokens, M)
    assert 0 < high < low < 1

    for i in range(3):
        if i == 1:
            state = reset_reference(state)
        state, metrics = step(state, batch)
        np.testing.assert_allclose(float(metrics["clip_frac_high"]), high, rtol=1e-6)
        np.testing.assert_allclose(float(metrics["clip_frac_low"]), low, rtol=1e-6)
        np.testing.assert_allclose(float(metrics["clip_frac"]), high + low, rtol=1e-6)
    assert step._cache_size() == 1
    assert int(state.step) == 3


def test_sharded_step_matches_single_device_with_groups_across_devices():
    grpo = GRPOConfig(num_generations=8, kl_coef=0.04, num_minibatches=2, num_iterations=2)
    # 2 prompts x G=8 = 16 rows over data*fsdp = 4 devices: every group spans two devices.
    # A large Adam eps keeps updates proportional to the gradient, so float reduction-order noise in
    # near-zero gradients is not amplified to a full lr-sized step (which would test Adam, not sharding).
    kw = dict(batch_size=2, lr=1e-2, adam_eps=1e-2)
    single_state, single_step, batch, _ = _setup(grpo, **kw)
    expected_state, expected = single_step(single_state, batch)
    mesh = mesh_2x2x2()
    state, step, _, _ = _setup(grpo, mesh=mesh, **kw)
    assert state.params["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )
    placed = sharding.shard_batch(_host(batch), mesh)
    got_state, got = step(state, placed)
    for key in expected:
        np.testing.assert_allclose(float(got[key]), float(expected[key]), rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
        _host(got_state.params),
        _host(expected_state.params),
    )


def test_gradient_matches_finite_differences():
    grpo = GRPOConfig(num_generations=4, kl_coef=0.1)
    _, _, batch, _ = _setup(grpo)
    params = tiny_params(CONFIG, seed=0)
    ref = tiny_params(CONFIG, seed=5)
    mb = dict(batch)
    from grpo_jax.training.grpo_step import completion_logprobs

    mb["ref_logprobs"] = completion_logprobs(CONFIG, ref, mb, temperature=1.0, chunk_size=128)
    mb["advantages"] = jnp.linspace(-1.0, 1.0, batch["completion_mask"].shape[0])
    mb["sample_weight"] = jnp.ones(batch["completion_mask"].shape[0])
    loss = jax.jit(lambda p: grpo_loss(p, mb, grpo=grpo, model_config=CONFIG)[0])
    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves
    unit = lambda tree: jax.tree_util.tree_map(
        lambda x: x / jnp.sqrt(sum(jnp.vdot(y, y) for y in leaves(tree))), tree
    )
    keys = iter(jax.random.split(jax.random.key(3), len(leaves(params))))
    random_direction = jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape), params)
    eps = 3e-2
    for direction in (unit(grads), unit(random_direction)):
        shifted = lambda s, d=direction: jax.tree_util.tree_map(lambda p, v: p + s * eps * v, params, d)
        numeric = float((loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps))
        analytic = float(sum(jnp.vdot(g, x) for g, x in zip(leaves(grads), leaves(direction))))
        assert abs(numeric - analytic) <= 0.05 * abs(analytic) + 1e-6, (numeric, analytic)
    assert float(jnp.sqrt(sum(jnp.vdot(g, g) for g in leaves(grads)))) > 1e-3


def test_nonfinite_update_is_skipped_and_counted():
    """Both halves of the guard `isfinite(loss) & isfinite(grad_norm)`: `poison` makes the loss NaN,
    `poison_grad` keeps the loss finite and makes only the gradient NaN."""
    state, step, batch, _ = _setup(GRPOConfig(num_generations=4), donate=False)
    switches = lambda loss, grad: {"poison": jnp.asarray(loss), "poison_grad": jnp.asarray(grad)}
    before = _host((state.params, state.opt_state))

    clean_state, clean = step(state, dict(batch, **switches(False, False)))
    assert float(clean["nonfinite_updates"]) == 0.0 and np.isfinite(float(clean["grad_norm"]))
    assert _moved(_host(clean_state.params), before[0])

    nan_loss_state, nan_loss = step(state, dict(batch, **switches(True, False)))
    assert np.isnan(float(nan_loss["loss"]))

    nan_grad_state, nan_grad = step(state, dict(batch, **switches(False, True)))
    assert float(nan_grad["loss"]) == float(clean["loss"])  # the forward value is untouched
    assert np.isnan(float(nan_grad["grad_norm"]))

    for new_state, metrics in ((nan_loss_state, nan_loss), (nan_grad_state, nan_grad)):
        assert float(metrics["nonfinite_updates"]) == 1.0
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, _host((new_state.params, new_state.opt_state)), before
        )
        assert int(new_state.step) == 1
    assert step._cache_size() == 1  # the switches are data: one program


@pytest.mark.parametrize("dynamic_sampling", [True, False])
def test_dynamic_sampling_masks_zero_variance_groups(dynamic_sampling):
    # Every group has zero reward variance, so Â = 0 and only the KL term (policy != reference) can move
    # the params: it does with the switch off; with it on, every token has weight 0 and nothing moves.
    grpo = GRPOConfig(num_generations=4, kl_coef=0.5, dynamic_sampling=dynamic_sampling)
    state, step, batch, _ = _setup(grpo, reward_fn=constant_reward)
    state = _with_reference(state)
    before = _host(state.params)
    new_state, metrics = step(state, batch)
    assert float(metrics["zero_variance_frac"]) == 1.0
    assert float(metrics["advantage/mean_abs"]) == 0.0
    assert float(metrics["nonfinite_updates"]) == 0.0
    if dynamic_sampling:
        assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
        jax.tree_util.tree_map(np.testing.assert_array_equal, _host(new_state.params), before)
    else:
        assert float(metrics["kl"]) > 1e-3 and float(metrics["loss"]) > 1e-3
        assert float(metrics["grad_norm"]) > 1e-3
        assert _moved(_host(new_state.params), before)


def _k3(logprobs, ref_logprobs):
    log_ratio = ref_logprobs - logprobs
    return np.expm1(log_ratio) - log_ratio


def test_kl_in_reward_matches_a_hand_computed_step():
    """kl_in_reward: score_i = r_i - β Σ_t k3(π_old, π_ref), group-normalised into Â; the loss has no KL."""
    G, beta, eps = 4, 0.5, 0.2
    grpo = GRPOConfig(num_generations=G, kl_coef=beta, kl_in_reward=True)
    state, step, batch, _ = _setup(grpo)
    state = _with_reference(state)
    from grpo_jax.training.grpo_step import completion_logprobs

    # Completions of 1..4 tokens (the mask carries the truth); π_old off the sampler's values (r inside
    # and outside the clip range) and -inf off-mask, which must reach neither the rewards nor the loss.
    n = batch["completion_mask"].shape[0]
    mask = np.arange(MAX_NEW)[None, :] < 1 + np.arange(n)[:, None] % MAX_NEW
    mask &= np.asarray(batch["completion_mask"]) > 0
    assert not mask.all()
    rng = np.random.default_rng(0)
    old = np.asarray(batch["old_logprobs"]) + rng.uniform(-0.3, 0.3, mask.shape)
    old = np.where(mask, old, -np.inf).astype(np.float32)
    batch = dict(batch, old_logprobs=jnp.asarray(old), completion_mask=jnp.asarray(mask, jnp.int32))
    logprob = lambda p: np.asarray(completion_logprobs(CONFIG, p, batch, temperature=1.0, chunk_size=128))
    policy, ref = logprob(tiny_params(CONFIG, seed=0)), logprob(tiny_params(CONFIG, seed=5))

    rewards = np.asarray(contains_target(batch, None)[0])
    seq_kl = np.where(mask, _k3(np.where(mask, old, 0.0), ref), 0.0).sum(axis=1)

    def group_advantages(scores):
        groups = scores.reshape(-1, G)
        centred = groups - groups.mean(axis=1, keepdims=True)
        flat = groups.min(axis=1, keepdims=True) == groups.max(axis=1, keepdims=True)
        return np.where(flat, 0.0, centred / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)

    advantages = group_advantages(rewards - beta * seq_kl)
    # The switch matters here: the KL makes groups informative whose rewards are all equal.
    assert np.abs(advantages).min() > 0 and np.abs(group_advantages(rewards)).min() == 0
    ratio = np.exp(np.where(mask, policy - old, 0.0))
    a = advantages[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    loss = np.mean(np.where(mask, per_token, 0.0).sum(axis=1) / mask.sum(axis=1))
    kl = np.mean(_k3(policy, ref)[mask])
    clip_frac = np.mean(((a > 0) & (ratio > 1 + eps) | (a < 0) & (ratio < 1 - eps))[mask])
    assert 0 < clip_frac < 1

    _, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["advantage/mean_abs"]), np.mean(np.abs(advantages)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["clip_frac"]), clip_frac, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/mean"]), rewards.mean(), rtol=1e-6)


def test_the_step_learns_a_bandit_task():
    grpo = GRPOConfig(num_generations=8, kl_coef=0.0, temperature=1.0)
    state, step, batch, _ = _setup(grpo, lr=1e-2, with_reference=False)
    tokens, mask = _prompts(4)
    rewards = []
    for i in range(60):
        rollout = sampling.generate(
            CONFIG,
            state.params,
            tokens,
            mask,
            jax.random.key(100 + i),
            num_samples=8,
            max_new_tokens=MAX_NEW,
            eos_id=EOS,
        )
        state, metrics = step(state, rollout_to_batch(rollout, {}, 8))
        rewards.append(float(metrics["reward/mean"]))
    assert np.mean(rewards[:5]) < 0.4
    assert np.mean(rewards[-5:]) > 0.9, rewards


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_gradient_accumulation_matches_one_big_batch(loss_agg):
    """Micro-batches of unequal token counts and sample weights: every micro-batch divides by the whole
    minibatch's denominator, so loss, gradient and update equal the unaccumulated step's for every
    aggregation (token_mean used to normalise each micro-batch by its own token count). The mismatch
    metrics are computed once on the update's rows, not averaged over micro-batches."""
    grpo = GRPOConfig(num_generations=4, kl_coef=0.04, loss_agg=loss_agg, dynamic_sampling=True)
    whole_state, whole_step, batch, _ = _setup(grpo, adam_eps=1e-2, batch_size=4, reward_fn=first_two_groups)
    accum_state, accum_step, _, _ = _setup(
        grpo, adam_eps=1e-2, batch_size=4, grad_accum_steps=2, reward_fn=first_two_groups
    )
    n = batch["completion_mask"].shape[0]
    # micro-batch 0 (rows 0, 2, ...) keeps 1 token per row, micro-batch 1 (rows 1, 3, ...) all of them
    lengths = np.where(np.arange(n) % 2 == 0, 1, MAX_NEW)
    mask = np.asarray(batch["completion_mask"]) * (np.arange(MAX_NEW)[None, :] < lengths[:, None])
    noise = np.random.default_rng(1).uniform(-0.5, 0.5, mask.shape).astype(np.float32)
    batch = dict(
        batch,
        completion_mask=jnp.asarray(mask, jnp.int32),
        sampling_logprobs=batch["old_logprobs"] + noise,
    )
    whole_state, whole = whole_step(whole_state, batch)
    accum_state, accum = accum_step(accum_state, batch)
    assert 0 < float(whole["zero_variance_frac"]) < 1  # some rows carry sample weight 0
    np.testing.assert_allclose(float(accum["loss"]), float(whole["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(accum["pg_loss"]), float(whole["pg_loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(accum["grad_norm"]), float(whole["grad_norm"]), rtol=1e-5)
    for key in ("mismatch/ratio_p01", "mismatch/ratio_p50", "mismatch/ratio_p99", "sampler_logprob_diff"):
        np.testing.assert_allclose(float(accum[key]), float(whole[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(whole["mismatch/ratio_p99"]) > 1.1
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        _host(accum_state.params),
        _host(whole_state.params),
    )


def first_two_groups(batch, params):
    """Rewards that vary inside the first two groups of 4 and are constant in the others (zero variance)."""
    n = batch["completion_mask"].shape[0]
    reward = ((jnp.arange(n) < 8) & (jnp.arange(n) % 2 == 0)).astype(jnp.float32)
    return reward, {"first_two": reward}


def test_learning_rate_is_logged_at_the_optimizers_own_count():
    """With a warmup, a skipped (non-finite) update does not advance optax's count, so the next step's
    update runs at the same learning rate, and that is what is logged (not step × updates per step)."""
    grpo = GRPOConfig(num_generations=4, num_minibatches=2)
    state, step, batch, _ = _setup(grpo, lr=1e-2, warmup_steps=10)
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-2, warmup_steps=10))
    state, first = step(state, dict(batch, poison=jnp.asarray(False)))
    np.testing.assert_allclose(float(first["learning_rate"]), float(schedule(0)), rtol=1e-6)
    state, skipped = step(state, dict(batch, poison=jnp.asarray(True)))
    assert float(skipped["nonfinite_updates"]) == 2.0
    state, after = step(state, dict(batch, poison=jnp.asarray(False)))
    np.testing.assert_allclose(float(skipped["learning_rate"]), float(schedule(2)), rtol=1e-6)
    np.testing.assert_allclose(float(after["learning_rate"]), float(schedule(2)), rtol=1e-6)
    assert float(schedule(2)) != float(schedule(4))


def test_kl_in_reward_zero_variance_is_judged_on_outcome_rewards():
    """Equal outcome rewards in every group: with kl_in_reward the scores r − β·KL differ, but dynamic
    sampling (as refill does) judges the groups on the outcome rewards and drops them all."""
    grpo = GRPOConfig(num_generations=4, kl_coef=0.5, kl_in_reward=True, dynamic_sampling=True)
    state, step, batch, _ = _setup(grpo, reward_fn=constant_reward)
    state = _with_reference(state)
    before = _host(state.params)
    new_state, metrics = step(state, batch)
    assert float(metrics["zero_variance_frac"]) == 1.0
    assert float(metrics["advantage/mean_abs"]) > 0  # the KL did move the scores
    assert float(metrics["loss"]) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host(new_state.params), before)


@pytest.mark.parametrize(
    "dtype, source, from_trainer",
    [
        ("bfloat16", "auto", True),
        ("bfloat16", "sampler", False),
        ("float32", "auto", False),
        ("float32", "trainer", True),
    ],
)
def test_old_logprobs_come_from_the_trainer_when_compute_is_not_fp32(dtype, source, from_trainer):
    """π_old: with bf16 compute ("auto") the trainer recomputes it, so the first update's ratio is exactly
    1 even where the sampler's numbers differ; with the sampler's logprobs (shifted here to stand for a
    different numeric path) it is not. Both with μ = 1 (the loss's own forward) and μ = 2 (precomputed)."""
    model_config = tiny_model_config(vocab_size=32, dtype=dtype)
    for iterations in (1, 2):
        grpo = GRPOConfig(num_generations=4, num_iterations=iterations, old_logprobs_source=source)
        state, step, batch, _ = _setup(grpo, model_config=model_config, lr=1e-6)
        batch = dict(batch, old_logprobs=batch["old_logprobs"] + 0.3)
        _, metrics = step(state, batch)
        assert float(metrics["old_logprobs_from_trainer"]) == float(from_trainer)
        ratio_max = float(metrics["ratio_max"])
        if from_trainer:  # μ = 2: the second update's params have moved by a 1e-6 step
            assert ratio_max == 1.0 if iterations == 1 else abs(ratio_max - 1.0) < 1e-3, ratio_max
        else:
            assert ratio_max < 0.85, ratio_max  # exp(−0.3) ≈ 0.74, up to rounding
