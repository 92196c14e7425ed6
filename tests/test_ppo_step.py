"""The one-program PPO step with a critic: sharded state and critic on the 2x2x2 mesh, one compile, config
validation, KL-only token rewards, NaN skip, a bandit the policy learns, and a critic whose loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import PPOConfig
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import (
    OptimizerConfig,
    completion_logprobs,
    create_ppo_state,
    learning_rate_schedule,
    make_optimizer,
    make_ppo_step,
    make_value_optimizer,
    rollout_to_batch,
    token_values,
)
from grpo_jax.training.ppo_step import ppo_targets

CONFIG = tiny_model_config(vocab_size=32)
EOS = 1
TARGET = 7
MAX_NEW = 3

RL_KEYS = (
    "reward/mean",
    "reward/std",
    "kl",
    "clip_frac",
    "entropy",
    "completion_len/mean",
    "truncated_frac",
    "loss",
    "pg_loss",
    "grad_norm",
    "nonfinite_updates",
    "vf_loss",
    "vf_clip_frac",
    "value_mean",
    "value_grad_norm",
    "advantage/mean_abs",
    "returns/mean",
    "learning_rate",
)


def first_token_is_target(batch, params):
    reward = (batch["completion_tokens"][:, 0] == TARGET).astype(jnp.float32)
    return reward, {"target": reward}


def _setup(ppo, *, mesh=None, lr=1e-2, seed=0, with_reference=True, reward_fn=first_token_is_target):
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt_config = OptimizerConfig(learning_rate=lr, max_grad_norm=1.0)
    optimizer = make_optimizer(opt_config)
    value_optimizer = make_value_optimizer(ppo, opt_config)
    params = jax.device_put(tiny_params(CONFIG, seed=seed), models.model_param_shardings(mesh, CONFIG))
    state, state_sh = create_ppo_state(
        params,
        optimizer,
        value_optimizer,
        mesh,
        CONFIG,
        rng=jax.random.key(seed),
        with_reference=with_reference,
    )
    step = make_ppo_step(
        ppo,
        CONFIG,
        optimizer,
        value_optimizer,
        reward_fn=reward_fn,
        mesh=mesh,
        state_shardings=state_sh,
        lr_schedule=learning_rate_schedule(opt_config),
    )
    return state, state_sh, step


def _prompts(num_prompts):
    """One-token prompts, all distinct (the sampler gives identical prompts identical samples)."""
    tokens = np.arange(2, 2 + num_prompts, dtype=np.int32)[:, None]
    return tokens, np.ones_like(tokens)


def _batch(params, ppo, *, num_prompts=4, seed=1):
    tokens, mask = _prompts(num_prompts)
    rollout = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(seed),
        num_samples=ppo.num_generations,
        max_new_tokens=MAX_NEW,
        temperature=ppo.temperature,
        eos_id=EOS,
    )
    return rollout_to_batch(rollout, {}, ppo.num_generations)


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def test_sharded_step_keeps_shardings_and_shards_the_critic():
    mesh = mesh_2x2x2()
    ppo = PPOConfig(num_generations=2, num_minibatches=2, num_iterations=2)
    state, state_sh, step = _setup(ppo, mesh=mesh)
    batch = sharding.shard_batch(_host(_batch(tiny_params(CONFIG), ppo)), mesh)
    new_state, metrics = step(state, batch)
    for key in RL_KEYS + ("reward/target",):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["nonfinite_updates"]) == 0.0
    expected = jax.tree_util.tree_leaves(state_sh)
    leaves = jax.tree_util.tree_leaves(new_state)
    assert len(leaves) == len(expected)
    for want, leaf in zip(expected, leaves):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (want, leaf.sharding)
    value_leaves = jax.tree_util.tree_leaves(new_state.aux["value_params"]["backbone"])
    assert any(x.addressable_shards[0].data.shape != x.shape for x in value_leaves)
    moments = jax.tree_util.tree_leaves(new_state.aux["value_opt_state"])
    assert any(x.ndim > 0 and x.addressable_shards[0].data.shape != x.shape for x in moments)
    assert state_sh.aux["value_params"]["head"]["kernel"].spec == jax.sharding.PartitionSpec()
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        new_state.aux["value_params"]["backbone"]["layers"]["up"],
        new_state.params["layers"]["up"],
    )
    assert moved > 0.0  # the critic's backbone trains apart from the policy


def test_step_compiles_once_and_is_one_program_with_named_scopes():
    traces = []

    def counting_reward(batch, params):
        traces.append(1)
        return first_token_is_target(batch, params)

    ppo = PPOConfig(num_generations=2)
    state, _, step = _setup(ppo, reward_fn=counting_reward)
    batch = _batch(tiny_params(CONFIG), ppo)
    hlo = step.lower(state, batch).as_text(debug_info=True)
    for scope in ("reference_logprobs", "rewards", "old_values", "advantages", "policy_loss", "value_loss"):
        assert scope in hlo, scope
    assert "optimizer" in hlo and hlo.count("func.func public @main") == 1
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert len(traces) == 1 and step._cache_size() == 1
    assert int(state.step) == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gamma", 1.5, "PPOConfig.gamma must be in \\[0, 1\\]"),
        ("lam", -0.1, "PPOConfig.lam must be in \\[0, 1\\]"),
        ("clip_eps", 0.0, "PPOConfig.clip_eps must be in \\(0, 1\\)"),
        ("value_clip_eps", -1.0, "PPOConfig.value_clip_eps must be > 0 or None"),
        ("kl_coef", -0.1, "PPOConfig.kl_coef must be >= 0"),
        ("kl_estimator", "k4", "PPOConfig.kl_estimator must be one of"),
        ("num_iterations", 0, "PPOConfig.num_iterations must be an integer >= 1"),
        ("num_generations", 1.5, "PPOConfig.num_generations must be an integer >= 1"),
        ("whiten_advantages", 1, "PPOConfig.whiten_advantages must be True or False"),
        ("temperature", float("nan"), "PPOConfig.temperature must be a finite number > 0"),
        ("value_learning_rate", 0.0, "PPOConfig.value_learning_rate must be > 0 or None"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**{field: value})


def test_config_from_dict_and_fields():
    with pytest.raises(ValueError, match="unknown PPOConfig key\\(s\\): vf_coef"):
        PPOConfig.from_dict({"gamma": 0.99, "vf_coef": 0.5})
    assert PPOConfig.from_dict({"lam": 1.0}).lam == 1.0
    fields = PPOConfig.config_fields(value_clip_eps=None, lam=0.9)
    assert fields["lam"] == 0.9 and "value_clip_eps" not in fields and "value_learning_rate" not in fields
    assert PPOConfig.from_dict(fields) == PPOConfig(value_clip_eps=0.2, lam=0.9)


def test_zero_outcome_rewards_leave_minus_beta_kl():
    ppo = PPOConfig(num_generations=2, kl_coef=0.5, gamma=1.0, lam=1.0, whiten_advantages=False)
    state, _, step = _setup(ppo, reward_fn=None)
    state = state.replace(ref_params=tiny_params(CONFIG, seed=5))
    batch = _batch(tiny_params(CONFIG), ppo)
    targets = jax.jit(lambda s, b: ppo_targets(ppo, CONFIG, s, b))(state, batch)
    mask = np.asarray(batch["completion_mask"], np.float32)
    ref = completion_logprobs(CONFIG, state.ref_params, batch, temperature=1.0, chunk_size=128)
    expected = -0.5 * (np.asarray(batch["old_logprobs"]) - np.asarray(ref)) * mask
    assert np.abs(expected).max() > 1e-3  # the reference really differs
    np.testing.assert_allclose(np.asarray(targets["token_rewards"]), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(targets["rewards"]), 0.0)
    # γ = λ = 1: the return at a token is the KL penalty still to come.
    to_go = np.flip(np.cumsum(np.flip(expected, axis=1), axis=1), axis=1) * mask
    np.testing.assert_allclose(np.asarray(targets["returns"]), to_go, atol=1e-5)
    values = token_values(CONFIG, state.aux["value_params"], batch)
    np.testing.assert_allclose(
        np.asarray(targets["advantages"]), (to_go - np.asarray(values)) * mask, atol=1e-5
    )
    _, metrics = step(state, batch)
    assert float(metrics["reward/mean"]) == 0.0
    np.testing.assert_allclose(float(metrics["kl_penalty"]), -expected.sum(axis=1).mean(), rtol=1e-5)


def test_nonfinite_update_is_skipped_for_policy_and_critic():
    ppo = PPOConfig(num_generations=2)
    state, _, step = _setup(ppo)
    batch = _batch(tiny_params(CONFIG), ppo)
    before = _host((state.params, state.aux))
    switches = lambda loss, grad: {"poison": jnp.asarray(loss), "poison_grad": jnp.asarray(grad)}
    new_state, metrics = step(state, dict(batch, **switches(True, False)))
    assert float(metrics["nonfinite_updates"]) == 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host((new_state.params, new_state.aux)), before)
    new_state, metrics = step(new_state, dict(batch, **switches(False, True)))  # finite loss, NaN grad
    assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
    assert float(metrics["nonfinite_updates"]) == 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host((new_state.params, new_state.aux)), before)
    _, metrics = step(new_state, dict(batch, **switches(False, False)))
    assert float(metrics["nonfinite_updates"]) == 0.0


def test_ppo_learns_a_bandit_task():
    ppo = PPOConfig(num_generations=4, kl_coef=0.0, num_iterations=2)
    state, _, step = _setup(ppo, lr=1e-2, with_reference=False)
    tokens, mask = _prompts(8)
    rewards = []
    for i in range(30):
        rollout = sampling.generate(
            CONFIG,
            state.params,
            tokens,
            mask,
            jax.random.key(100 + i),
            num_samples=ppo.num_generations,
            max_new_tokens=MAX_NEW,
            eos_id=EOS,
        )
        state, metrics = step(state, rollout_to_batch(rollout, {}, ppo.num_generations))
        rewards.append(float(metrics["reward/mean"]))
    assert np.mean(rewards[:3]) < 0.15, rewards
    assert np.mean(rewards[-5:]) > 0.6, rewards


def test_critic_learns_the_returns_of_a_fixed_batch():
    # λ = 1, β = 0: the returns are the outcome rewards, whatever the critic says; the policy barely moves.
    ppo = PPOConfig(num_generations=2, kl_coef=0.0, lam=1.0, value_learning_rate=3e-2)
    state, _, step = _setup(ppo, lr=1e-7, with_reference=False, reward_fn=None)
    batch = _batch(tiny_params(CONFIG), ppo)
    batch["host_rewards"] = jnp.linspace(-2.0, 2.0, batch["completion_mask"].shape[0])
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["vf_loss"]))
    assert losses[-1] < 0.3 * losses[0], losses


def test_reference_and_critic_forwards_run_one_minibatch_at_a_time():
    """`ppo_targets` runs the reference and the critic over the M minibatches one at a time (lax.map): the
    same targets as the whole-batch forward, with the compiled program's temporaries about 1/M of it."""
    whole, split = PPOConfig(num_generations=4), PPOConfig(num_generations=4, num_minibatches=4)
    state, _, _ = _setup(whole)
    state = state.replace(ref_params=jax.tree_util.tree_map(lambda x: x * 1.01, state.ref_params))
    batch = _batch(state.params, whole, num_prompts=16)
    targets = {}
    temp = {}
    for name, ppo in (("whole", whole), ("split", split)):
        fn = jax.jit(lambda s, b, ppo=ppo: ppo_targets(ppo, CONFIG, s, b))
        compiled = fn.lower(state, batch).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
        targets[name] = _host(compiled(state, batch))
    for key in ("kl", "old_values", "advantages", "returns"):
        np.testing.assert_allclose(targets["split"][key], targets["whole"][key], rtol=1e-5, atol=1e-6)
    assert np.abs(targets["whole"]["kl"]).max() > 0
    assert temp["split"] < 0.5 * temp["whole"], temp
