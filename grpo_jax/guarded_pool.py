"""Untrusted-ish Python calls with time limits, in-process or in a pool of worker processes that never
crashes or hangs its caller: the machinery shared by the host reward runner (`rewards/host.py`) and the
tool-use environments (`envs/runner.py`); docs/ARCHITECTURE.md.

A call is `fns[name](*args)`. Each comes back as `(value, status, message)`: status is `OK`, `ERROR` (the
call raised, or its worker died) or `TIMEOUT`; `value` is None unless OK. Nothing raises into the caller.

Time-outs, two layers (a hung thread cannot be killed):
  * `num_workers > 0`: each worker is a separate process (`spawn` by default: safe after JAX has started
    its threads) that runs calls one at a time under a SIGALRM timer of `timeout_s`, which interrupts
    Python code (and `time.sleep`). A worker that sends no result for `timeout_s + kill_grace_s` is stuck
    in C code: it is killed (SIGKILL), its current call counts as a time-out, the rest of its chunk goes
    back to the queue, and a fresh worker replaces it, so the batch finishes and the next batch runs
    normally. A worker that dies counts its current call as an error and is replaced the same way. `fns`
    and arguments must be picklable (top-level functions, `functools.partial` of them, plain data).
  * `num_workers = 0`: in-process, for tests and small batches. Calls run under the same SIGALRM timer when
    the pool is called from the main thread with no timer already armed; otherwise without a time limit.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

OK, ERROR, TIMEOUT = 0, 1, 2
_READY = "ready"

CallResult = tuple[Any, int, str]  # (value or None, status, message)


class _CallTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` inside a call cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _CallTimeout()


def _can_use_alarm() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )


def guarded_call(fn: Callable, args: Sequence, timeout_s: float | None) -> CallResult:
    """`fn(*args)` under a SIGALRM timer of `timeout_s` (where one can be armed); never raises."""
    use_alarm = bool(timeout_s) and _can_use_alarm()
    previous = signal.signal(signal.SIGALRM, _raise_timeout) if use_alarm else None
    try:
        try:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = fn(*args)
        finally:
            if use_alarm:
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                finally:  # Restored even if the alarm fires before it is disarmed.
                    signal.signal(signal.SIGALRM, previous)
    except _CallTimeout:
        return None, TIMEOUT, f"timed out after {timeout_s} s"
    except (Exception, SystemExit) as error:  # A call must never crash the run.
        return None, ERROR, f"{type(error).__name__}: {error}"
    return value, OK, ""


def _worker_main(connection, fns: Mapping[str, Callable], timeout_s: float | None) -> None:
    """Worker process: announce readiness, then answer each (name, args) call of each chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send(_READY)
    while True:
        try:
            chunk = connection.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for name, args in chunk:
            result = guarded_call(fns[name], args, timeout_s)
            try:
                connection.send(result)
            except (pickle.PicklingError, TypeError, AttributeError) as error:
                connection.send((None, ERROR, f"unpicklable result: {error}"))


class _Worker:
    def __init__(self, context, fns, timeout_s, startup_timeout_s: float, label: str):
        self.connection, child_connection = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child_connection, fns, timeout_s), daemon=True, name=label
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


class GuardedPool:
    """Runs batches of named calls with time limits; see the module docstring.

    Args:
      fns: name -> picklable callable.
      timeout_s: time limit of one call in seconds (None: no limit).
      num_workers: worker processes; 0 runs in-process; None uses min(8, cpu count).
      kill_grace_s: extra seconds a worker may overrun one call before it is killed.
      startup_timeout_s: seconds a fresh worker may take to start before it is given up.
      mp_context: multiprocessing start method ("spawn", "forkserver"; "fork" is unsafe once JAX runs).
      label: what the calls are, in messages and worker process names (e.g. "host reward").
    """

    def __init__(
        self,
        fns: Mapping[str, Callable],
        *,
        timeout_s: float | None = 5.0,
        num_workers: int | None = None,
        kill_grace_s: float = 2.0,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
        label: str = "guarded call",
    ):
        self.fns = dict(fns)
        self.timeout_s = timeout_s
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.kill_grace_s = kill_grace_s
        self.startup_timeout_s = startup_timeout_s
        self.label = label
        self._context = multiprocessing.get_context(mp_context)
        self._workers: list[_Worker] = []
        if self.num_workers:
            try:
                pickle.dumps(self.fns)
            except Exception as error:
                raise ValueError(
                    f"{label} functions must be picklable for num_workers > 0 (use top-level functions): "
                    f"{error}"
                ) from error

    def run(self, payload: Sequence[tuple[str, Sequence]]) -> list[CallResult]:
        """One `(value, status, message)` per `(name, args)` of `payload`, in order."""
        if self.num_workers == 0:
            return [guarded_call(self.fns[name], args, self.timeout_s) for name, args in payload]
        return self._run_in_workers(list(payload))

    # --- process pool -----------------------------------------------------------------------------------

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self.fns, self.timeout_s, self.startup_timeout_s, self.label)

    def _start_workers(self) -> None:
        self._workers = [w for w in self._workers if w.process.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())

    def _replace(self, worker: _Worker, *, restart: bool) -> None:
        worker.kill()
        self._workers.remove(worker)
        if restart:
            self._workers.append(self._new_worker())

    def _run_in_workers(self, payload: list[tuple]) -> list[CallResult]:
        self._start_workers()
        results: list[CallResult | None] = [None] * len(payload)
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
                    results[index] = (None, ERROR, f"no {self.label} worker could start")
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
                        results[worker.chunk.pop(0)] = (None, ERROR, f"{self.label} worker died")
                        pending.insert(0, worker.chunk)
                    self._replace(worker, restart=worker.ready)
            now = time.monotonic()
            for worker in [w for w in self._workers if (not w.ready or w.chunk) and w.deadline <= now]:
                if worker.chunk:
                    results[worker.chunk.pop(0)] = (
                        None,
                        TIMEOUT,
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

    def __del__(self):
        try:
            self.close()
        except Exception:  # Interpreter shutdown may have torn down the modules.
            pass
