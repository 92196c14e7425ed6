"""Train state and optimizer: learning-rate schedules against hand-computed values, Adam moments sharded
like their params on a real mesh, and the SFT step's non-finite guard when only the gradient is NaN."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import models, sharding
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
from grpo_jax.training.sft_step import make_sft_step

PEAK = 1e-3


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_constant_schedule_warms_up_linearly_then_holds_the_peak():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=PEAK, warmup_steps=4, total_steps=100))
    np.testing.assert_allclose(
        _values(schedule, [0, 1, 2, 3, 4, 5, 99, 1000]),
        [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3],
        rtol=1e-6,
        atol=1e-12,
    )
    flat = learning_rate_schedule(OptimizerConfig(learning_rate=PEAK, warmup_steps=0, total_steps=100))
    assert _values(flat, [0, 7, 1000]) == pytest.approx([1e-3] * 3, rel=1e-6)


def test_cosine_schedule_warmup_then_half_cosine_to_a_tenth_of_the_peak():
    # warmup 10 updates to 1e-3, then 1e-4 + 9e-4 * (1 + cos(pi * (s - 10) / 100)) / 2 until s = 110.
    schedule = learning_rate_schedule(
        OptimizerConfig(learning_rate=PEAK, warmup_steps=10, total_steps=110, schedule="cosine")
    )
    quarter = 1e-4 + 4.5e-4 * (1 + math.cos(math.pi / 4))  # s = 35: 8.6819805e-4
    three_quarters = 1e-4 + 4.5e-4 * (1 + math.cos(3 * math.pi / 4))  # s = 85: 2.3180195e-4
    np.testing.assert_allclose(
        _values(schedule, [0, 5, 10, 35, 60, 85, 110, 111, 10_000]),
        [0.0, 5e-4, 1e-3, quarter, 5.5e-4, three_quarters, 1e-4, 1e-4, 1e-4],
        rtol=1e-5,
        atol=1e-12,
    )


def test_cosine_schedule_without_warmup_starts_at_the_peak():
    # No warmup: update 0 gets the peak (not 0), and the cosine spans all 100 updates.
    schedule = learning_rate_schedule(
        OptimizerConfig(learning_rate=PEAK, warmup_steps=0, total_steps=100, schedule="cosine")
    )
    np.testing.assert_allclose(
        _values(schedule, [0, 50, 100, 500]), [1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5, atol=1e-12
    )
    # The optimizer really uses it: Adam's first update is -lr(0) * g / (|g| + eps) per coordinate.
    optimizer = make_optimizer(
        OptimizerConfig(learning_rate=PEAK, warmup_steps=0, total_steps=100, schedule="cosine")
    )
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.asarray([0.1, -0.2, 0.3])}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-1e-3, 1e-3, -1e-3], rtol=1e-5)


def test_adam_moments_are_sharded_like_their_params():
    config = tiny_model_config()
    mesh = mesh_2x2x2()
    param_shardings = models.model_param_shardings(mesh, config)
    params = jax.device_put(tiny_params(config), param_shardings)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=PEAK))
    state, _ = create_train_state(params, optimizer, mesh, param_shardings, rng=jax.random.key(0))

    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    shard_shape = lambda x: x.addressable_shards[0].data.shape
    for name in ("mu", "nu"):
        moments = getattr(adam, name)

        def check(path, moment, param, name=name):
            where = name + jax.tree_util.keystr(path)
            assert moment.shape == param.shape and len(moment.addressable_shards) == 8, where
            assert shard_shape(moment) == shard_shape(param), where
            assert moment.sharding.is_equivalent_to(param.sharding, moment.ndim), where

        jax.tree_util.tree_map_with_path(check, moments, state.params)
        # Really split, not replicated: q [L, D, H, Dh] = [2, 32, 4, 8] over fsdp (D) and tensor (H);
        # embed [V, D] = [128, 32] over tensor (V) and fsdp (D).
        assert shard_shape(moments["layers"]["q"]) == (2, 16, 2, 8)
        assert shard_shape(moments["embed"]) == (64, 16)


def test_reference_dtype_stores_the_frozen_copy_in_bfloat16():
    """`reference_dtype="bf16"`: π_ref is the policy cast to bfloat16 (half its bytes), sharded like it;
    the policy and its optimizer moments stay float32; a bad name fails in one line."""
    config = tiny_model_config()
    mesh = mesh_2x2x2()
    param_shardings = models.model_param_shardings(mesh, config)
    params = jax.device_put(tiny_params(config), param_shardings)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=PEAK))
    full, _ = create_train_state(params, optimizer, mesh, param_shardings, rng=jax.random.key(0))
    half, _ = create_train_state(
        params, optimizer, mesh, param_shardings, rng=jax.random.key(0), reference_dtype="bf16"
    )
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    assert nbytes(half.ref_params) * 2 == nbytes(full.ref_params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.float32)}
    jax.tree_util.tree_map(
        lambda r, p: np.testing.assert_array_equal(np.asarray(r), np.asarray(p.astype(jnp.bfloat16))),
        half.ref_params,
        params,
    )
    assert half.ref_params["layers"]["q"].sharding.is_equivalent_to(params["layers"]["q"].sharding, 4)
    with pytest.raises(ValueError, match="reference_dtype must be one of"):
        create_train_state(
            params, optimizer, mesh, param_shardings, rng=jax.random.key(0), reference_dtype="fp8"
        )


# ------------------------------------------------------------------------------------------------
# The SFT step's non-finite guard
# ------------------------------------------------------------------------------------------------


def _sft_batch(config, batch_size=4, length=8):
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (batch_size, length), 3, config.vocab_size))
    attention_mask = np.ones_like(tokens)
    attention_mask[0, :2] = 0
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, length // 2 :] = 1
    return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def test_sft_step_skips_an_update_whose_gradient_alone_is_nan():
    config = tiny_model_config()
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    param_shardings = models.model_param_shardings(mesh, config)
    params = jax.device_put(tiny_params(config), param_shardings)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    state, state_sh = create_train_state(
        params, optimizer, mesh, param_shardings, rng=jax.random.key(0), with_reference=False
    )
    step = make_sft_step(config, optimizer, mesh=mesh, state_shardings=state_sh, donate=False)
    batch = _sft_batch(config)
    switches = lambda loss, grad: {"poison": np.bool_(loss), "poison_grad": np.bool_(grad)}

    clean_state, clean = step(state, dict(batch, **switches(False, False)))
    poisoned_state, poisoned = step(state, dict(batch, **switches(False, True)))
    assert step._cache_size() == 1  # the switches are data, not a second program

    # The loss value is untouched (only `isfinite(grad_norm)` can catch this), the gradient is NaN.
    assert np.isfinite(float(poisoned["loss"])) and float(poisoned["loss"]) == float(clean["loss"])
    assert np.isnan(float(poisoned["grad_norm"])) and np.isfinite(float(clean["grad_norm"]))
    assert float(poisoned["nonfinite_updates"]) == 1.0 and float(clean["nonfinite_updates"]) == 0.0
    # Skipped: params and optimizer state exactly as before; the clean step did move them.
    before = _host((state.params, state.opt_state))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, _host((poisoned_state.params, poisoned_state.opt_state)), before
    )
    moved = jax.tree_util.tree_map(
        lambda a, b: not np.array_equal(a, b), _host(clean_state.params), before[0]
    )
    assert any(jax.tree_util.tree_leaves(moved))
    assert int(poisoned_state.step) == 1

    _, nan_loss = step(state, dict(batch, **switches(True, False)))
    assert np.isnan(float(nan_loss["loss"])) and float(nan_loss["nonfinite_updates"]) == 1.0
