"""The bookkeeping of a pipelined (asynchronous) GRPO stage: the rollouts in flight and the data position
a checkpoint records while they are (docs/ARCHITECTURE.md, "Asynchronous GRPO").

With `config.<stage>.off_policy_steps` = k >= 1 the stage keeps the rollouts of steps s .. s + k in
flight while step s trains: each was dispatched (on the sampler mesh, or co-located) under the newest
params the sampler had then, so the one step s trains on was sampled by the params of step s − k or
later. The rollouts are not checkpointed: a resume samples them again, under the restored params, from
the same prompts and keys (`fold_in(state.rng, target step)`), so a resumed run is deterministic, though
not bit-identical to the uninterrupted pipelined run (its first resumed step is on-policy).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class InFlight:
    """One dispatched rollout.

    target: the stage step (`state.step`) whose update trains on it; version: the `state.step` of the
    params that sampled it (its tokens' `behaviour_version`); prompts: the host prompt batch (numpy, this
    process's rows); rollout: the sampler's `Rollout`, on the sampler's mesh, possibly still running;
    data_state: the data iterator's state before this batch was taken (what a checkpoint records while
    it is in flight); dispatched_at: `time.time()` at dispatch.
    """

    target: int
    version: int
    prompts: dict
    rollout: Any
    data_state: Any
    dispatched_at: float


def check_lag(item: InFlight, step: int, max_lag: int) -> int:
    """The lag `step − item.version` of the rollout step `step` trains on; raises when it is not the
    rollout of that step or is more than `max_lag` (= off_policy_steps) updates old."""
    if item.target != step:
        raise RuntimeError(
            f"pipelined rollouts out of order: step {step} got the rollout of step {item.target}"
        )
    lag = step - item.version
    if not 0 <= lag <= max_lag:
        raise RuntimeError(
            f"step {step} would train on a rollout of policy version {item.version}: {lag} updates old, "
            f"more than off_policy_steps={max_lag}"
        )
    return lag


class InflightDataIterator:
    """The stage's data iterator, seen by the trainer's checkpoints as if the rollouts in flight had not
    taken their prompt batches yet: `get_state` is the state before the oldest in-flight batch (the
    inner iterator's own when none is), `set_state` (a resume) drops what is in flight. The trainer calls
    only these and `next`."""

    def __init__(self, inner, inflight: collections.deque):
        self.inner = inner
        self.inflight = inflight

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def snapshot(self):
        """The inner iterator's state now (a deep copy: it must not change as the iterator moves on)."""
        return copy.deepcopy(self.inner.get_state())

    def get_state(self):
        if self.inflight:
            return copy.deepcopy(self.inflight[0].data_state)
        return self.inner.get_state()

    def set_state(self, state):
        self.inflight.clear()
        self.inner.set_state(state)


def prompt_truncated(item: InFlight) -> np.ndarray:
    return np.asarray(item.prompts["prompt_truncated"])
