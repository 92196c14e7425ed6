"""Python rewards on the host, between the sampler and the jitted step (docs/ARCHITECTURE.md), that never
crash a run.

A host reward is `fn(completion_text, example) -> float`. `HostRewardRunner` applies several of them to a
batch and returns one float32 array `[N]` per reward name. A call that raises, returns a non-finite value,
or runs past `timeout_s` scores 0 and is counted in the stats (`num_errors`, `num_timeouts`), with one
`RuntimeWarning` per batch quoting the first failure.

Time-outs, two layers (sympy can hang, and a hung thread cannot be killed):
  * `num_workers > 0`: each worker is a separate process (`spawn` by default: safe after JAX has started
    its threads) that runs calls one at a time under a SIGALRM timer of `timeout_s`, which interrupts
    Python code (and `time.sleep`). A worker that sends no result for `timeout_s + kill_grace_s` is stuck
    in C code: it is killed (SIGKILL), its current call counts as a time-out, the rest of its chunk goes
    back to the queue, and a fresh worker replaces it, so the batch finishes and the next batch runs
    normally. A worker that dies counts its current call as an error and is replaced the same way. `fns`
    and examples must be picklable (top-level functions, `functools.partial` of them, plain dicts).
  * `num_workers = 0`: in-process, for tests and small batches. Calls run under the same SIGALRM timer when
    the runner is called from the main thread with no timer already armed; otherwise without a time
    limit.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

import numpy as np

from grpo_jax.rewards.countdown import countdown_reward
from grpo_jax.rewards.math import extract_answer, is_equivalent

HostRewardFn = Callable[[str, Mapping[str, Any]], float]

_OK, _ERROR, _TIMEOUT = 0, 1, 2
_READY = "ready"


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
# One guarded call (shared by the in-process path and the workers).
# ---------------------------------------------------------------------------------------------------------


class _RewardTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` inside a reward cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _RewardTimeout()


def _can_use_alarm() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )


def _guarded_call(fn: HostRewardFn, text: str, example, timeout_s: float | None) -> tuple[float, int, str]:
    """(reward, status, message); status is _OK, _ERROR or _TIMEOUT; never raises an Exception."""
    use_alarm = bool(timeout_s) and _can_use_alarm()
    previous = signal.signal(signal.SIGALRM, _raise_timeout) if use_alarm else None
    try:
        try:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = float(fn(text, example))
        finally:
            if use_alarm:
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                finally:  # Restored even if the alarm fires before it is disarmed.
                    signal.signal(signal.SIGALRM, previous)
    except _RewardTimeout:
        return 0.0, _TIMEOUT, f"timed out after {timeout_s} s"
    except (Exception, SystemExit) as error:  # A reward must never crash the run.
        return 0.0, _ERROR, f"{type(error).__name__}: {error}"
    if not np.isfinite(value):
        return 0.0, _ERROR, f"non-finite reward {value}"
    return value, _OK, ""


def _worker_main(connection, fns: Mapping[str, HostRewardFn], timeout_s: float | None) -> None:
    """Worker process: announce readiness, then answer each (name, text, example) call of each chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send(_READY)
    while True:
        try:
            chunk = connection.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for name, text, example in chunk:
            connection.send(_guarded_call(fns[name], text, example, timeout_s))


class _Worker:
    def __init__(self, context, fns, timeout_s, startup_timeout_s: float):
        self.connection, child_connection = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child_connection, fns, timeout_s), daemon=True, name="host-reward"
        )
        self.process.start()
        child_connection.close()
        self.ready = False
        self.chunk: list[int] | None = None
        self.deadline = time.monotonic() + startup_timeout_s

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)
        self.connection.close()


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
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.kill_grace_s = kill_grace_s
        self.startup_timeout_s = startup_timeout_s
        self._context = multiprocessing.get_context(mp_context)
        self._workers: list[_Worker] = []
        if self.num_workers:
            try:
                pickle.dumps(self.fns)
            except Exception as error:
                raise ValueError(
                    "host reward functions must be picklable for num_workers > 0 (use top-level functions): "
                    f"{error}"
                ) from error

    def __call__(
        self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Rewards name -> float32 `[N]`, and stats {num_calls, num_errors, num_timeouts, time_s}."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        start = time.monotonic()
        calls = [(name, i) for name in self.fns for i in range(len(completions))]
        payload = [(name, completions[i], examples[i]) for name, i in calls]
        if self.num_workers == 0:
            results = [_guarded_call(self.fns[name], text, ex, self.timeout_s) for name, text, ex in payload]
        else:
            results = self._run_in_workers(payload)
        rewards = {name: np.zeros(len(completions), np.float32) for name in self.fns}
        first_failure = None
        for (name, i), (value, status, message) in zip(calls, results, strict=True):
            rewards[name][i] = value
            if status != _OK and first_failure is None:
                first_failure = f"{name}[{i}]: {message}"
        statuses = [status for _, status, _ in results]
        stats = {
            "num_calls": len(calls),
            "num_errors": statuses.count(_ERROR),
            "num_timeouts": statuses.count(_TIMEOUT),
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

    # --- process pool -----------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        self._workers = [w for w in self._workers if w.process.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self.fns, self.timeout_s, self.startup_timeout_s))

    def _replace(self, worker: _Worker, *, restart: bool) -> None:
        worker.kill()
        self._workers.remove(worker)
        if restart:
            self._workers.append(_Worker(self._context, self.fns, self.timeout_s, self.startup_timeout_s))

    def _run_in_workers(self, payload: list[tuple]) -> list[tuple[float, int, str]]:
        self._start_workers()
        results: list[tuple[float, int, str] | None] = [None] * len(payload)
        chunk_size = max(1, -(-len(payload) // (4 * self.num_workers)))
        pending = [
            list(range(s, min(s + chunk_size, len(payload)))) for s in range(0, len(payload), chunk_size)
        ]
        call_budget = (self.timeout_s or float("inf")) + self.kill_grace_s

        while pending or any(w.chunk for w in self._workers):
            for worker in self._workers:
                if worker.ready and not worker.chunk and pending:
                    worker.chunk = pending.pop(0)
                    worker.connection.send([payload[i] for i in worker.chunk])
                    worker.deadline = time.monotonic() + call_budget
            waiting = [w for w in self._workers if not w.ready or w.chunk]
            if not waiting:
                for index in (i for chunk in pending for i in chunk):
                    results[index] = (0.0, _ERROR, "no host reward worker could start")
                break
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = wait_for_connections([w.connection for w in waiting], timeout=min(timeout, 60.0))
            for worker in [w for w in waiting if w.connection in ready]:
                try:
                    while worker.connection.poll():
                        message = worker.connection.recv()
                        if not worker.ready:
                            worker.ready = message == _READY
                            continue
                        results[worker.chunk.pop(0)] = message
                        worker.deadline = time.monotonic() + call_budget
                except (EOFError, OSError):
                    if worker.chunk:
                        results[worker.chunk.pop(0)] = (0.0, _ERROR, "host reward worker died")
                        pending.insert(0, worker.chunk)
                    self._replace(worker, restart=worker.ready)
            now = time.monotonic()
            for worker in [w for w in self._workers if (not w.ready or w.chunk) and w.deadline <= now]:
                if worker.chunk:
                    results[worker.chunk.pop(0)] = (
                        0.0,
                        _TIMEOUT,
                        f"worker stuck {call_budget:.1f} s; killed",
                    )
                    if worker.chunk:
                        pending.insert(0, worker.chunk)
                self._replace(worker, restart=worker.ready)
        return results

    def close(self) -> None:
        """Stops the worker processes."""
        for worker in self._workers:
            try:
                worker.connection.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=1.0)
            worker.kill()
        self._workers = []

    def __enter__(self) -> HostRewardRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # Interpreter shutdown may have torn down the modules.
            pass
