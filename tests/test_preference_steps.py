"""Reward-model and DPO steps: the RM learns held-out arithmetic preferences, sharded == one device,
DPO starts at log 2 with zero margins and then separates its training pairs, NaN steps are skipped."""

import functools

import jax
import numpy as np
import pytest

from grpo_jax import models, sharding
from grpo_jax.data import ArithmeticTask, make_preference_dataset, synthetic_preference_pairs
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_tokenizer
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    init_rm_params_from,
    learning_rate_schedule,
    make_dpo_eval,
    make_dpo_step,
    make_optimizer,
    make_rm_eval,
    make_rm_step,
    rm_param_shardings,
)
from grpo_jax.training.preference_steps import reference_logprobs

CONFIG = tiny_model_config()
MAX_LEN = 48  # the raw template keeps 1-2 digit additions under 40 tokens
BATCH = 32
KINDS = ("wrong_answer", "malformed", "wrong_step")


def _batches(pairs, batch_size, **kw):
    kw = dict(template="raw", max_len=MAX_LEN, batch_size=batch_size, seed=0) | kw
    for batch in make_preference_dataset(pairs, tiny_tokenizer(), **kw):
        # a fixed key set: the poisoned steps reuse the program
        yield dict(batch, poison=np.bool_(False), poison_grad=np.bool_(False))


@functools.cache
def _task():
    return ArithmeticTask(num_digits=(1, 2), operations=("+",), seed=0)


@functools.cache
def _policy_params():
    return jax.jit(lambda key: models.init_params(CONFIG, key))(jax.random.key(0))


def _single_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@functools.cache
def _rm_setup(lr=3e-3):
    """(optimizer, single-device RM step) shared by the tests, so the step compiles once."""
    opt_config = OptimizerConfig(learning_rate=lr, max_grad_norm=1.0)
    optimizer = make_optimizer(opt_config)
    mesh = _single_device_mesh()
    _, shardings = _rm_state(optimizer, mesh)
    step = make_rm_step(
        CONFIG,
        optimizer,
        mesh=mesh,
        state_shardings=shardings,
        lr_schedule=learning_rate_schedule(opt_config),
    )
    return optimizer, step


def _rm_state(optimizer, mesh):
    shardings = rm_param_shardings(mesh, CONFIG)
    params = init_rm_params_from(_policy_params(), CONFIG, jax.random.key(1))
    params = jax.device_put(params, shardings)
    return create_train_state(params, optimizer, mesh, shardings, rng=jax.random.key(0), with_reference=False)


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------


def test_rm_learns_heldout_preferences_and_skips_nan_steps():
    train_pairs = synthetic_preference_pairs(_task().split("train", 640), seed=0)
    test_pairs = synthetic_preference_pairs(_task().split("test", 240), seed=1)
    optimizer, step = _rm_setup()
    state, _ = _rm_state(optimizer, _single_device_mesh())
    evaluate = make_rm_eval(CONFIG)
    heldout = {  # one batch of unseen problems per corruption kind, same shape: one eval program
        kind: next(_batches([p for p in test_pairs if p["kind"] == kind], BATCH, shuffle=False))
        for kind in KINDS
    }
    assert not any(b["truncated"].any() for b in heldout.values())
    before = {kind: evaluate(state.params, batch) for kind, batch in heldout.items()}

    batches = _batches(train_pairs, BATCH)
    losses = []
    for _ in range(80):
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {
        "loss",
        "rm/accuracy",
        "rm/margin",
        "rm/chosen",
        "rm/rejected",
        "grad_norm",
        "nonfinite_updates",
        "learning_rate",
    }
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1 and np.mean(losses[-10:]) < 0.5
    after = {kind: evaluate(state.params, batch) for kind, batch in heldout.items()}
    accuracy = np.mean([float(m["rm/accuracy"]) for m in after.values()])
    assert np.mean([float(m["rm/accuracy"]) for m in before.values()]) < 0.6
    assert accuracy > 0.62, after  # chance is 0.5
    assert float(after["malformed"]["rm/accuracy"]) > 0.95 and float(after["malformed"]["rm/margin"]) > 1.0
    assert step._cache_size() == 1

    params = jax.device_get(state.params)
    state, metrics = step(state, dict(next(batches), poison=np.bool_(True)))
    assert float(metrics["nonfinite_updates"]) == 1.0 and int(state.step) == 81
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), params)
    # poison_grad: the loss stays finite, only the gradient is NaN; the guard still skips the update.
    state, metrics = step(state, dict(next(batches), poison_grad=np.bool_(True)))
    assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
    assert float(metrics["nonfinite_updates"]) == 1.0 and int(state.step) == 82
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), params)
    assert step._cache_size() == 1


def test_rm_step_sharded_2x2x2_matches_one_device():
    optimizer, single_step = _rm_setup()
    pairs = synthetic_preference_pairs(_task().split("train", BATCH), seed=0)
    batch = next(_batches(pairs, BATCH, shuffle=False))
    single_state, _ = _rm_state(optimizer, _single_device_mesh())
    _, expected = single_step(single_state, batch)

    mesh = mesh_2x2x2()
    state, shardings = _rm_state(optimizer, mesh)
    step = make_rm_step(CONFIG, optimizer, mesh=mesh, state_shardings=shardings)
    state, metrics = step(state, sharding.shard_batch(batch, mesh))

    embed = state.params["backbone"]["embed"]  # [V, D] over (tensor, fsdp)
    assert embed.shape == (CONFIG.vocab_size, CONFIG.hidden_size)
    assert embed.addressable_shards[0].data.shape == (CONFIG.vocab_size // 2, CONFIG.hidden_size // 2)
    assert state.params["head"]["kernel"].sharding.is_fully_replicated
    for key in ("loss", "rm/accuracy", "rm/margin", "rm/chosen", "grad_norm"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------


def test_dpo_starts_at_log2_and_separates_training_pairs():
    pairs = synthetic_preference_pairs(
        _task().split("train", 16), seed=0, kinds=("wrong_answer", "wrong_step")
    )
    batch = next(_batches(pairs, 16, shuffle=False))
    mesh = _single_device_mesh()
    opt_config = OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0)
    optimizer = make_optimizer(opt_config)
    shardings = models.model_param_shardings(mesh, CONFIG)
    params = jax.device_put(_policy_params(), shardings)
    state, state_sh = create_train_state(params, optimizer, mesh, shardings, rng=jax.random.key(0))
    beta = 0.1
    evaluate = make_dpo_eval(CONFIG, beta=beta)

    start = evaluate(state.params, state.ref_params, batch)
    np.testing.assert_allclose(start["loss"], np.log(2.0), rtol=0, atol=1e-6)
    for key in ("dpo/reward_chosen", "dpo/reward_rejected", "dpo/reward_margin", "dpo/reward_accuracy"):
        assert float(start[key]) == 0.0, key
    assert float(start["dpo/logp_chosen"]) < 0 and float(start["dpo/logp_rejected"]) < 0

    step = make_dpo_step(
        CONFIG,
        optimizer,
        beta=beta,
        mesh=mesh,
        state_shardings=state_sh,
        lr_schedule=learning_rate_schedule(opt_config),
    )
    reference = jax.device_get(state.ref_params)
    history = []
    for _ in range(6):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert set(metrics) == {
        "loss",
        "dpo/reward_chosen",
        "dpo/reward_rejected",
        "dpo/reward_margin",
        "dpo/reward_accuracy",
        "dpo/logp_chosen",
        "dpo/logp_rejected",
        "grad_norm",
        "nonfinite_updates",
        "learning_rate",
    }
    np.testing.assert_allclose(history[0]["loss"], np.log(2.0), atol=1e-6)  # π_θ == π_ref before update 1
    end = evaluate(state.params, state.ref_params, batch)
    assert float(end["loss"]) < np.log(2.0) - 0.05
    assert float(end["dpo/reward_margin"]) > 0.25 and float(end["dpo/reward_accuracy"]) >= 0.9, end
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.ref_params), reference)
    assert step._cache_size() == 1


def test_dpo_argument_checks():
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    with pytest.raises(ValueError, match="beta must be > 0"):
        make_dpo_step(CONFIG, optimizer, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_dpo_eval(CONFIG, beta=0.1, label_smoothing=0.5)
    given = {"ref_chosen_logprobs": np.array([-3.0, -4.0]), "ref_rejected_logprobs": np.array([-5.0, -6.0])}
    chosen, rejected = reference_logprobs(CONFIG, None, given)  # precomputed: no reference forward needed
    np.testing.assert_array_equal(chosen, [-3.0, -4.0])
    np.testing.assert_array_equal(rejected, [-5.0, -6.0])
    with pytest.raises(ValueError, match="needs a reference"):
        reference_logprobs(CONFIG, None, {})
