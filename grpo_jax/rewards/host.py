"""Python rewards on the host, between the sampler and the jitted step (docs/ARCHITECTURE.md), that never
crash a run.

A host reward is `fn(completion_text, example) -> float`. `HostRewardRunner` applies several of them to a
batch and returns one float32 array `[N]` per reward name. A call that raises, returns a non-finite value,
or runs past `timeout_s` scores 0 and is counted in the stats (`num_errors`, `num_timeouts`), with one
`RuntimeWarning` per batch quoting the first failure.

Time-outs (sympy can hang, and a hung thread cannot be killed) come from the shared machinery of
`grpo_jax/guarded_pool.py`: with `num_workers > 0` each call runs in a worker process under a SIGALRM timer
of `timeout_s`; a worker stuck in C code past `timeout_s + kill_grace_s` is killed and replaced, a worker
that dies is replaced, and the batch finishes. `num_workers = 0` runs in-process (tests, small batches).
`fns` and examples must be picklable (top-level functions, `functools.partial` of them, plain dicts).
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from grpo_jax.guarded_pool import ERROR, OK, TIMEOUT, GuardedPool
from grpo_jax.rewards.countdown import countdown_reward
from grpo_jax.rewards.math import extract_answer, is_equivalent

HostRewardFn = Callable[[str, Mapping[str, Any]], float]


# ---------------------------------------------------------------------------------------------------------
# Ready-made host rewards.
# ---------------------------------------------------------------------------------------------------------


def math_accuracy_reward(completion_text: str, example: Mapping[str, Any]) -> float:
    """1.0 if the extracted answer is equivalent to `example["answer"]` (itself unboxed / `####`-stripped)."""
    predicted = extract_answer(completion_text)
    if predicted is None:
        return 0.0
    gold = str(example["answer"])
    return 1.0 if is_equivalent(predicted, extract_answer(gold) or gold) else 0.0


def countdown_host_reward(completion_text: str, example: Mapping[str, Any]) -> float:
    """TinyZero's Countdown score against `example["numbers"]` and `example["target"]`."""
    return countdown_reward(completion_text, example["numbers"], example["target"])


_R1_FORMAT = re.compile(
    r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*",
    re.DOTALL,
)


def r1_format_reward(completion_text: str, example: Mapping[str, Any]) -> float:
    """DeepSeek-R1 format reward on text: 1.0 iff the completion is `<think> … </think> <answer> … </answer>`
    with each tag once, in order (whitespace around allowed). The text-level twin of the in-graph
    `format` reward, which reads the same verdict from token ids with any tokenizer (tags split into
    several tokens included); the caller passes the completion without its stop token."""
    return 1.0 if _R1_FORMAT.fullmatch(completion_text) else 0.0


HOST_REWARDS: dict[str, HostRewardFn] = {
    "math_accuracy": math_accuracy_reward,
    "countdown": countdown_host_reward,
    "r1_format": r1_format_reward,
}


# ---------------------------------------------------------------------------------------------------------
# One scored call: the reward-specific check around the shared guarded call (grpo_jax/guarded_pool.py).
# ---------------------------------------------------------------------------------------------------------


def _scored(fn: HostRewardFn, text: str, example: Mapping[str, Any]) -> float:
    """`float(fn(text, example))`; a non-finite reward raises, so it scores 0 and counts as an error."""
    value = float(fn(text, example))
    if not np.isfinite(value):
        raise ValueError(f"non-finite reward {value}")
    return value


# ---------------------------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------------------------


class HostRewardRunner:
    """Applies named host rewards to a batch of completions; see the module docstring.

    Args:
      fns: reward name -> `fn(completion_text, example) -> float`.
      timeout_s: time limit of one call in seconds (None: no limit).
      num_workers: worker processes; 0 runs in-process; None uses min(8, cpu count).
      kill_grace_s: extra seconds a worker may overrun its chunk budget before it is killed.
      startup_timeout_s: seconds a fresh worker may take to start before it is given up.
      mp_context: multiprocessing start method ("spawn", "forkserver"; "fork" is unsafe once JAX runs).
    """

    def __init__(
        self,
        fns: Mapping[str, HostRewardFn],
        *,
        timeout_s: float | None = 5.0,
        num_workers: int | None = None,
        kill_grace_s: float = 2.0,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
    ):
        if not fns:
            raise ValueError("HostRewardRunner needs at least one reward function")
        self.fns = dict(fns)
        self.timeout_s = timeout_s
        self._pool = GuardedPool(
            {name: functools.partial(_scored, fn) for name, fn in self.fns.items()},
            timeout_s=timeout_s,
            num_workers=num_workers,
            kill_grace_s=kill_grace_s,
            startup_timeout_s=startup_timeout_s,
            mp_context=mp_context,
            label="host reward",
        )
        self.num_workers = self._pool.num_workers

    def __call__(
        self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Rewards name -> float32 `[N]`, and stats {num_calls, num_errors, num_timeouts, time_s}."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        start = time.monotonic()
        calls = [(name, i) for name in self.fns for i in range(len(completions))]
        results = self._pool.run([(name, (completions[i], examples[i])) for name, i in calls])
        rewards = {name: np.zeros(len(completions), np.float32) for name in self.fns}
        first_failure = None
        for (name, i), (value, status, message) in zip(calls, results, strict=True):
            rewards[name][i] = value if status == OK else 0.0
            if status != OK and first_failure is None:
                first_failure = f"{name}[{i}]: {message}"
        statuses = [status for _, status, _ in results]
        stats = {
            "num_calls": len(calls),
            "num_errors": statuses.count(ERROR),
            "num_timeouts": statuses.count(TIMEOUT),
            "time_s": time.monotonic() - start,
        }
        if first_failure is not None:
            warnings.warn(
                f"HostRewardRunner: {stats['num_errors']} errors and {stats['num_timeouts']} time-outs in "
                f"{len(calls)} calls; first: {first_failure}",
                RuntimeWarning,
                stacklevel=2,
            )
        return rewards, stats

    def close(self) -> None:
        """Stops the worker processes."""
        self._pool.close()

    def __enter__(self) -> HostRewardRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # Interpreter shutdown may have torn down the modules.
            pass
