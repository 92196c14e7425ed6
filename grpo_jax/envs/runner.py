"""Steps N environments at once in worker processes with time limits (docs/ARCHITECTURE.md, "Tool use").

`EnvRunner(factory)` keeps one environment per trajectory in the parent. `reset(examples)` and
`step(texts)` ship each live environment with its input to `grpo_jax.guarded_pool.GuardedPool` (the host
reward runner's machinery: worker processes, SIGALRM timers, stuck workers killed and replaced) and take
the new state back. A step that raises, dies or runs past `timeout_s` ends that trajectory (done, reward 0,
an error observation) and is counted; the others go on, and nothing raises into the caller.

Stats of a step (`StepOutput.stats`, names carry `tool` as the metric contract asks): `tool/num_calls`,
`tool/num_errors`, `tool/errors/<kind>` for each kind of tool_format.ERROR_KINDS, `tool/num_turn_limits`,
`env/num_steps`, `env/num_errors`, `env/num_timeouts`, `env/time_s`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from grpo_jax.envs.base import Environment
from grpo_jax.envs.tool_format import ERROR_KINDS, ToolFormat, format_observation
from grpo_jax.guarded_pool import OK, TIMEOUT, GuardedPool


def _reset(env: Environment, example: Mapping[str, Any]) -> tuple[Environment, str]:
    observation = env.reset(example)
    if not isinstance(observation, str):
        raise TypeError(f"reset returned {type(observation).__name__}, not str")
    return env, observation


def _step(env: Environment, text: str) -> tuple[Environment, str, float, bool, dict]:
    observation, reward, done, info = env.step(text)
    if not isinstance(observation, str):
        raise TypeError(f"step returned an observation of type {type(observation).__name__}, not str")
    return env, observation, float(reward), bool(done), dict(info)


@dataclasses.dataclass
class StepOutput:
    """One batched step. observations: list of N str (None for rows that were already done or skipped);
    rewards: float32 [N]; dones: bool [N] (after this step); infos: N dicts; stats: see module docstring."""

    observations: list[str | None]
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]
    stats: dict[str, float]


class EnvRunner:
    """N trajectories of one environment; see the module docstring.

    Args:
      factory: picklable `() -> Environment` (e.g. `functools.partial(make_env, "calculator", max_turns=4)`).
      timeout_s: time limit of one reset or step of one trajectory, in seconds (above the tools' own).
      num_workers: worker processes; 0 runs in-process; None uses min(8, cpu count).
      kill_grace_s, startup_timeout_s, mp_context: as `GuardedPool`'s.
      fmt: the format of the error observation of a failed step.
    """

    def __init__(
        self,
        factory: Callable[[], Environment],
        *,
        timeout_s: float | None = 30.0,
        num_workers: int | None = None,
        kill_grace_s: float = 2.0,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
        fmt: ToolFormat = ToolFormat(),
    ):
        self.factory = factory
        self.fmt = fmt
        self._pool = GuardedPool(
            {"reset": _reset, "step": _step},
            timeout_s=timeout_s,
            num_workers=num_workers,
            kill_grace_s=kill_grace_s,
            startup_timeout_s=startup_timeout_s,
            mp_context=mp_context,
            label="environment",
        )
        self.envs: list[Environment] = []
        self.done = np.zeros((0,), bool)

    def reset(self, examples: Sequence[Mapping[str, Any]]) -> list[str]:
        """Starts len(examples) trajectories; their first observations. A failed reset starts that row done
        with an empty observation (counted as an error in the next step's stats and warned about)."""
        self.envs = [self.factory() for _ in examples]
        results = self._pool.run([("reset", (env, ex)) for env, ex in zip(self.envs, examples, strict=True)])
        self.done = np.zeros((len(examples),), bool)
        observations = []
        failures = []
        for i, (value, status, message) in enumerate(results):
            if status == OK:
                self.envs[i], observation = value
            else:
                self.done[i], observation = True, ""
                failures.append(f"[{i}]: {message}")
            observations.append(observation)
        if failures:
            warnings.warn(
                f"EnvRunner.reset: {len(failures)} failed; first {failures[0]}", RuntimeWarning, stacklevel=2
            )
        return observations

    def step(self, texts: Sequence[str | None]) -> StepOutput:
        """Steps every live trajectory whose text is not None with the model's turn `texts[i]`."""
        if len(texts) != len(self.envs):
            raise ValueError(f"{len(texts)} texts for {len(self.envs)} environments")
        start = time.monotonic()
        rows = [i for i, text in enumerate(texts) if text is not None and not self.done[i]]
        results = self._pool.run([("step", (self.envs[i], texts[i])) for i in rows])
        n = len(texts)
        observations: list[str | None] = [None] * n
        rewards = np.zeros((n,), np.float32)
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        errors = {kind: 0 for kind in ERROR_KINDS}
        stats = {"tool/num_calls": 0, "tool/num_turn_limits": 0, "env/num_errors": 0, "env/num_timeouts": 0}
        first_failure = None
        for i, (value, status, message) in zip(rows, results, strict=True):
            if status == OK:
                self.envs[i], observation, reward, done, info = value
                if not np.isfinite(reward):
                    reward, info = 0.0, {**info, "env_error": f"non-finite reward {reward}"}
                    stats["env/num_errors"] += 1
            else:
                observation = format_observation(f"error (environment): {message}", self.fmt)
                reward, done, info = 0.0, True, {"env_error": message}
                stats["env/num_timeouts" if status == TIMEOUT else "env/num_errors"] += 1
                first_failure = first_failure or f"[{i}]: {message}"
            observations[i], rewards[i], infos[i] = observation, reward, info
            self.done[i] = self.done[i] or done
            if info.get("tool") is not None or info.get("tool_error") is not None:
                stats["tool/num_calls"] += 1
            if info.get("tool_error") in errors:
                errors[info["tool_error"]] += 1
            stats["tool/num_turn_limits"] += int(bool(info.get("turn_limit")))
        if first_failure is not None:
            warnings.warn(
                f"EnvRunner: {stats['env/num_errors']} errors and {stats['env/num_timeouts']} time-outs in "
                f"{len(rows)} steps; first {first_failure}",
                RuntimeWarning,
                stacklevel=2,
            )
        stats |= {f"tool/errors/{kind}": count for kind, count in errors.items()}
        stats["tool/num_errors"] = sum(errors.values())
        stats["env/num_steps"] = len(rows)
        stats["env/time_s"] = time.monotonic() - start
        return StepOutput(observations, rewards, self.done.copy(), infos, stats)

    def close(self) -> None:
        """Stops the worker processes."""
        self._pool.close()

    def __enter__(self) -> EnvRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
