"""Train state and optimizer: learning-rate schedules against hand-computed values, Adam moments sharded
like their params on a real mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import sharding
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer

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
    param_shardings = sharding.model_param_shardings(mesh, config)
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
