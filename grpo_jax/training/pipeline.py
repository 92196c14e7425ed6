"""The bookkeeping of a pipelined (asynchronous) GRPO stage: the rollouts in flight and the data position
a checkpoint records while they are (docs/ARCHITECTURE.md, "Asynchronous GRPO").

With `config.<stage>.off_policy_steps` = k >= 1 the stage keeps the rollouts of steps s .. s + k in
flight while step s trains: each was dispatched (on the sampler mesh, or co-located) under the newest
params the sampler had then, so the one step s trains on was sampled by the params of step s − k or
later. The rollouts are not checkpointed: a resume samples them again, under the restored params, from
the same prompts and keys (`fold_in(state.rng, target step)`), so a resumed run is deterministic, though
not bit-identical to the uninterrupted pipelined run (its first resumed step is on-policy).

With partial rollouts each in-flight item is one engine call (enqueue, decode <= budget, hand out) and the
engine's state runs ahead with them: `oldest_versions` and `check_partial_lag` bound a trained group's
staleness by its oldest token (k + the steps it was carried).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any

import jax.numpy as jnp
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


def oldest_versions(version, mask, num_samples: int):
    """[B] int32: the version of the oldest token of each group of a partial-rollout hand-out (the min over
    its G rows' valid tokens; int32 max for a fill place). version, mask [B·G, L]. Jittable."""
    big = jnp.iinfo(jnp.int32).max
    rows = jnp.min(jnp.where(mask > 0, version.astype(jnp.int32), big), axis=1)
    return jnp.min(rows.reshape(-1, num_samples), axis=1)


def check_partial_lag(step: int, oldest, enqueued, fill, max_lag: int) -> dict[str, float]:
    """The staleness bound of pipelined partial rollouts, checked on what step `step` trains
    (docs/ARCHITECTURE.md, "Partial rollouts in the pipeline"). A group enqueued by the engine call of
    step e (its token 0 drawn by that call's prefill, under version v_0 with e − k <= v_0 <= e) and handed
    out by the call of step `step` was carried c = step − e calls; every later token of it was drawn by a
    later call, under a version no older than that call's − k. So the oldest token bounds the group's
    staleness: step − v_0 <= k + c, each of its tokens at most k + c updates old. Raises one line when a
    group's tags break it (v_0 outside [e − k, e], or e after `step`).

    oldest, enqueued, fill: [B] host arrays (the `oldest_versions` of the hand-out, its groups' enqueue
    step, its fill flags); max_lag: k = off_policy_steps. -> the carry metrics of the real groups."""
    oldest, enqueued = np.asarray(oldest, np.int64), np.asarray(enqueued, np.int64)
    real = ~np.asarray(fill, bool)
    for v0, e in zip(oldest[real], enqueued[real]):
        if not (e - max_lag <= v0 <= e <= step):
            raise RuntimeError(
                f"step {step} would train a partial-rollout group enqueued at step {e} whose oldest token is "
                f"of policy version {v0}: {step - v0} updates old, more than off_policy_steps={max_lag} "
                f"+ its {step - e} carried steps"
            )
    carried = (step - enqueued[real]).astype(np.float64)
    return {
        "partial/carried_steps_mean": float(carried.mean()) if carried.size else 0.0,
        "partial/carried_steps_max": float(carried.max()) if carried.size else 0.0,
    }


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
