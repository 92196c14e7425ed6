"""Exact-number tests of the advantage estimators (grpo_jax.algorithms.advantages)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax.algorithms import advantages as adv
from grpo_jax.algorithms import grpo

# Two groups of G = 4: one correct answer out of four, then two out of four.
REWARDS = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32)
SQRT3_OVER_2 = np.sqrt(3.0) / 2.0  # 0.5 / std([1, 1, 0, 0], ddof=1)


def test_grpo_group_scale_exact_numbers():
    # group 1: mean 1/4, Bessel std 1/2; group 2: mean 1/2, Bessel std sqrt(1/3).
    expected = [1.5, -0.5, -0.5, -0.5, SQRT3_OVER_2, SQRT3_OVER_2, -SQRT3_OVER_2, -SQRT3_OVER_2]
    np.testing.assert_allclose(grpo.group_advantages(REWARDS, 4), expected, rtol=1e-5)
    np.testing.assert_allclose(adv.compute_advantages("grpo", REWARDS, 4), expected, rtol=1e-5)


def test_grpo_eps_is_added_to_std():
    got = adv.group_advantages(REWARDS[:4], 4, eps=0.5)
    np.testing.assert_allclose(got, [0.75, -0.25, -0.25, -0.25], rtol=1e-6)  # centred / (0.5 + 0.5)


def test_scale_none_and_batch():
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    np.testing.assert_allclose(adv.group_advantages(REWARDS, 4, scale="none"), centred, rtol=1e-6)
    # Batch std of the centred rewards: sqrt(1.75 / 7) = 0.5.
    np.testing.assert_allclose(
        adv.group_advantages(REWARDS, 4, scale="batch"), [1.5, -0.5, -0.5, -0.5, 1, 1, -1, -1], rtol=1e-5
    )
    with pytest.raises(ValueError, match="scale"):
        adv.group_advantages(REWARDS, 4, scale="global")


def test_dr_grpo_is_mean_centred_only():
    np.testing.assert_allclose(
        adv.compute_advantages("dr_grpo", REWARDS, 4, eps=1e-6),
        [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5],
        rtol=1e-6,
    )


def test_rloo_leave_one_out_mean():
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3]
    np.testing.assert_allclose(adv.compute_advantages("rloo", REWARDS, 4), expected, rtol=1e-6)
    np.testing.assert_allclose(adv.rloo_advantages([1.0, 2.0, 6.0], 3), [-3.0, -1.5, 4.5], rtol=1e-6)


def test_reinforce_pp_uses_batch_statistics():
    mean = REWARDS.astype(np.float64).mean()  # 3/8
    std = np.sqrt(((REWARDS - mean) ** 2).sum() / 7)  # Bessel over the batch
    expected = (REWARDS - mean) / (std + 1e-6)
    np.testing.assert_allclose(expected[0], 0.625 / (0.5175492 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(adv.compute_advantages("reinforce_pp", REWARDS, 4), expected, rtol=1e-5)


def test_reinforce_pp_token_whitening_weighs_completions_by_length():
    """verl's convention: mean and (Bessel) std over tokens, each completion counting once per token."""
    lengths = np.array([6, 1, 2, 1, 4, 5, 1, 2], np.float64)  # the rewarded completions are the long ones
    tokens = np.repeat(REWARDS.astype(np.float64), lengths.astype(int))  # every token's reward
    expected = (REWARDS - tokens.mean()) / (tokens.std(ddof=1) + 1e-6)
    got = adv.reinforce_pp_advantages(REWARDS, 4, token_counts=lengths)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    by_sequence = adv.reinforce_pp_advantages(REWARDS, 4)
    assert np.abs(np.asarray(got) - np.asarray(by_sequence)).max() > 0.3


@pytest.mark.parametrize("name", sorted(adv.ADVANTAGE_ESTIMATORS))
def test_identical_rewards_give_exactly_zero(name):
    rewards = np.full(6, 0.1, np.float32)  # 0.1 is not exact in binary: a naive mean would not cancel
    assert np.array_equal(adv.compute_advantages(name, rewards, 3), np.zeros(6))


@pytest.mark.parametrize("scale", adv.ADVANTAGE_SCALES)
def test_identical_group_is_zero_for_every_scale(scale):
    rewards = np.array([0.3, 0.3, 0.3, 1.0, 0.0, 0.2], np.float32)
    got = np.asarray(adv.group_advantages(rewards, 3, scale=scale))
    assert np.array_equal(got[:3], np.zeros(3))
    assert np.all(got[3:] != 0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_one_sample_groups_give_zero(name):
    assert np.array_equal(adv.compute_advantages(name, [1.0, 0.0, 3.0], 1), np.zeros(3))


def test_unknown_estimator_and_ragged_batch_raise():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        adv.compute_advantages("ppo", REWARDS, 4)
    with pytest.raises(ValueError, match="whole groups of size 3"):
        adv.group_advantages(REWARDS, 3)


def test_zero_variance_groups_mask():
    rewards = np.array([1, 1, 0, 1, 2, 2, 2, 2, 0, 0, 0, 0], np.float32)
    expected = [False] * 4 + [True] * 8
    assert grpo.zero_variance_groups(rewards, 4).tolist() == expected


def test_groups_spanning_devices_under_jit_match_eager():
    # 16 rewards over 8 devices: each group of 4 spans two devices.
    rewards = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], np.float32)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(rewards, NamedSharding(mesh, PartitionSpec("data")))
    for name in adv.ADVANTAGE_ESTIMATORS:
        compiled = jax.jit(lambda r, name=name: adv.compute_advantages(name, r, 4))
        np.testing.assert_allclose(compiled(sharded), adv.compute_advantages(name, rewards, 4), atol=1e-5)
    got = jax.jit(lambda r: adv.zero_variance_groups(r, 4))(sharded)
    assert not np.any(got)


def test_process_supervision_exact_numbers():
    # Group 0: valid step rewards {1, 0, 0}: mean 1/3, Bessel std sqrt(1/3) -> 1 ↦ 2/√3, 0 ↦ -1/√3.
    # Group 1: all valid step rewards equal -> 0. Group 2: {0, 1, 1, 0} -> ±√3/2; an end index past
    # T counts as the last token.
    step_rewards = np.array([[1, 0], [0, 5], [1, 1], [1, 7], [0, 1], [1, 0]], np.float32)
    step_mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 1]], np.float32)
    step_end = np.array([[1, 3], [2, 9], [0, 3], [2, 1], [0, 7], [1, 2]], np.int32)
    got = adv.process_advantages(step_rewards, step_mask, step_end, group_size=2, num_tokens=4)
    hi, lo, h = 2 / np.sqrt(3), -1 / np.sqrt(3), SQRT3_OVER_2
    expected = [
        [hi + lo, hi + lo, lo, lo],
        [lo, lo, lo, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [-h + h, h, h, h],
        [h - h, h - h, -h, 0],
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
