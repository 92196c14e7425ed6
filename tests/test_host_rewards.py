"""grpo_jax.rewards.host: batched host rewards that never crash the run and never hang it."""

import os
import signal
import time

import numpy as np
import pytest

from grpo_jax.rewards.host import HOST_REWARDS, HostRewardRunner, countdown_host_reward, math_accuracy_reward

TIMEOUT_S = 1.0


# Reward functions live at module level so that spawned workers can unpickle them.
def length_reward(text, example):
    return float(len(text))


def flaky_reward(text, example):
    """Misbehaves as `example["mode"]` says: raise, sleep past the timeout, hang in 'C code', die, NaN."""
    mode = example.get("mode")
    if mode == "raise":
        raise ValueError("bad completion")
    if mode == "sleep":
        time.sleep(30)
    if mode == "stuck":  # SIGALRM blocked: like a long C call, only killing the process stops it.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(30)
    if mode == "die":
        os._exit(3)
    if mode == "nan":
        return float("nan")
    return 2.0


@pytest.fixture(scope="module")
def pool_runner():
    runner = HostRewardRunner(
        {"length": length_reward, "flaky": flaky_reward}, timeout_s=TIMEOUT_S, num_workers=2, kill_grace_s=1.0
    )
    yield runner
    runner.close()


def test_in_process_exception_nan_and_timeout_score_zero_and_are_counted():
    runner = HostRewardRunner(
        {"length": length_reward, "flaky": flaky_reward}, timeout_s=TIMEOUT_S, num_workers=0
    )
    examples = [{}, {"mode": "raise"}, {"mode": "sleep"}, {"mode": "nan"}]
    start = time.monotonic()
    with pytest.warns(
        RuntimeWarning, match=r"2 errors and 1 time-outs in 8 calls; first: flaky\[1\]: ValueError"
    ):
        rewards, stats = runner(["a", "bb", "ccc", "dddd"], examples)
    assert time.monotonic() - start < TIMEOUT_S + 3.0
    np.testing.assert_array_equal(rewards["length"], np.array([1, 2, 3, 4], np.float32))
    np.testing.assert_array_equal(rewards["flaky"], np.array([2, 0, 0, 0], np.float32))
    assert rewards["flaky"].dtype == np.float32
    assert (stats["num_calls"], stats["num_errors"], stats["num_timeouts"]) == (8, 2, 1)
    rewards, stats = runner(["x", "yy"], [{}, {}])
    np.testing.assert_array_equal(rewards["flaky"], [2.0, 2.0])
    assert stats["num_errors"] == stats["num_timeouts"] == 0


def test_pool_timeouts_and_errors_do_not_block_the_next_batch(pool_runner):
    pool_runner(["warm"], [{}])  # start the workers outside the timed part
    examples = [{}, {"mode": "raise"}, {}, {"mode": "sleep"}, {}, {}]
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="1 errors and 1 time-outs in 12 calls"):
        rewards, stats = pool_runner(["a", "bb", "ccc", "dddd", "eeeee", "ffffff"], examples)
    assert time.monotonic() - start < TIMEOUT_S + 4.0
    np.testing.assert_array_equal(rewards["length"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(rewards["flaky"], [2, 0, 2, 0, 2, 2])
    assert (stats["num_errors"], stats["num_timeouts"]) == (1, 1)
    rewards, stats = pool_runner(["x"] * 5, [{}] * 5)
    np.testing.assert_array_equal(rewards["flaky"], [2.0] * 5)
    assert stats["num_errors"] == stats["num_timeouts"] == 0


def test_pool_kills_a_stuck_worker_and_replaces_a_dead_one(pool_runner):
    pool_runner(["warm"], [{}])
    examples = [{"mode": "stuck"}, {}, {"mode": "die"}, {}, {}, {}]
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="1 errors and 1 time-outs"):
        rewards, stats = pool_runner(["a"] * 6, examples)
    # The stuck call is given up after timeout_s + kill_grace_s; a replacement worker may start meanwhile.
    assert time.monotonic() - start < 30.0
    np.testing.assert_array_equal(rewards["flaky"], [0, 2, 0, 2, 2, 2])
    np.testing.assert_array_equal(rewards["length"], [1] * 6)
    assert (stats["num_errors"], stats["num_timeouts"]) == (1, 1)
    rewards, stats = pool_runner(["b"] * 4, [{}] * 4)
    np.testing.assert_array_equal(rewards["flaky"], [2.0] * 4)
    assert stats["num_errors"] == stats["num_timeouts"] == 0


def test_ready_made_rewards_in_process_and_registry():
    examples = [
        {"answer": "72", "numbers": [1, 2], "target": 3},
        {"answer": r"#### \frac{1}{2}", "numbers": [1, 2], "target": 3},
        {"answer": r"the answer is \boxed{10}", "numbers": [1, 2], "target": 3},
        {"answer": "5", "numbers": [1, 2], "target": 3},
    ]
    completions = [
        r"so \boxed{72}",
        "<answer>0.5</answer>",
        r"<answer>2 + 1</answer> \boxed{10.0}",
        "no answer",
    ]
    assert set(HOST_REWARDS) == {"math_accuracy", "countdown", "r1_format"}
    scores = [math_accuracy_reward(c, e) for c, e in zip(completions, examples, strict=True)]
    assert scores == [1.0, 1.0, 1.0, 0.0]
    assert countdown_host_reward("<answer>2 + 1</answer>", examples[0]) == 1.0
    rewards, stats = HostRewardRunner(HOST_REWARDS, num_workers=0)(completions, examples)
    np.testing.assert_array_equal(rewards["math_accuracy"], [1, 1, 1, 0])
    np.testing.assert_allclose(rewards["countdown"], [0, 0.1, 1, 0])
    assert stats["num_errors"] == 0


def test_bad_arguments_raise_at_the_boundary():
    with pytest.raises(ValueError, match="picklable"):
        HostRewardRunner({"lambda": lambda text, example: 1.0}, num_workers=1)
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        HostRewardRunner({"length": length_reward}, num_workers=0)(["a", "b"], [{}])
    with pytest.raises(ValueError):
        HostRewardRunner({}, num_workers=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think> 2+2=4 </think> <answer> 4 </answer>", 1.0),
        ("  <think>a\nb</think>\n<answer>4</answer> ", 1.0),
        ("<answer> 4 </answer>", 0.0),
        ("<think> a </think> <answer> 4 </answer> trailing", 0.0),
        ("<think> a </think> <think> b </think> <answer> 4 </answer>", 0.0),
        ("<answer> 4 </answer> <think> a </think>", 0.0),
        ("<think> a <answer> 4 </answer> </think>", 0.0),
    ],
)
def test_r1_format_reward_on_text(text, expected):
    from grpo_jax.rewards.host import HOST_REWARDS, r1_format_reward

    assert r1_format_reward(text, {}) == expected
    assert HOST_REWARDS["r1_format"] is r1_format_reward
