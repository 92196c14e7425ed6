"""Preemption: SIGTERM stops a run between steps, on every process at the same step, after that step's
checkpoint is saved (`trainer.run_stage` checks `stop_agreed` after each step); the command exits with
`PREEMPTED_EXIT_CODE` and the same command resumes."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np

# os.EX_TEMPFAIL: "temporary failure, retry"; distinct from success (0), an error (1) and a process killed
# by a signal, so a job script can requeue the same command on it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """SIGTERM stopped the run after a step whose checkpoint is saved; the same command resumes it.

    `checkpoint_step` is the resume point (None if no checkpoint could be saved yet)."""

    def __init__(self, message: str, checkpoint_step: int | None):
        super().__init__(message)
        self.checkpoint_step = checkpoint_step


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """While inside, SIGTERM sets the yielded event instead of killing the process; the previous
    handler is restored on exit. Outside the main thread (where Python cannot install handlers) the
    event is never set and SIGTERM keeps its old meaning."""
    request = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.getsignal(signal.SIGTERM)
    # Only sets a flag: the loop checks it between steps, where stopping leaves a consistent state.
    signal.signal(signal.SIGTERM, lambda signum, frame: request.set())
    try:
        yield request
    finally:  # None: a handler installed outside Python, which Python cannot reinstall
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stop_agreed(request: threading.Event | None) -> bool:
    """True on every process once any process's `request` is set, False on every process otherwise.

    Every process must call it at the same points (it is a collective when process_count() > 1): the
    signal may reach the hosts of a pod at different steps, and a checkpoint is a collective save."""
    local = request is not None and request.is_set()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(local))).any())
