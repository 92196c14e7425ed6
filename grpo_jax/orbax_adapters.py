"""Adapters around orbax-checkpoint internals (orbax 0.12.8), kept apart from `grpo_jax.checkpointing`
so that an orbax upgrade touches one file: the noise filters for abandoned array reads and read-only
managers, the CheckpointManager that survives a damaged metrics item, and the keep-last-plus-best
preservation policy. Each names the orbax behaviour it depends on; `tests/test_checkpointing.py` and
`tests/test_resume.py` exercise all of them.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys

import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

_ABANDONED_READ = "Encountered error while reading array index"
# TensorStore's own read failure, e.g. 'OUT_OF_RANGE: Error reading "params.layers.q/0.0.0.0" in OCDBT
# database at local file ...': an abandoned read's gathering future may carry it unwrapped.
_TENSORSTORE_READ_ERROR = re.compile(r"[A-Z_]+: Error reading ")


def _is_abandoned_read(error: BaseException | None) -> bool:
    text = str(error)
    return (
        text.startswith(_ABANDONED_READ)
        or (isinstance(error, RuntimeError) and text == "Event loop is closed")
        or (isinstance(error, ValueError) and _TENSORSTORE_READ_ERROR.match(text) is not None)
    )


class _DropAbandonedReads(logging.logging.Filter):
    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (_is_abandoned_read(error) or _ABANDONED_READ in record.getMessage())


def drop_abandoned_read_noise() -> None:
    """Install, once per process, the filters `quiet_abandoned_reads` describes. They drop only the
    abandoned reads' own reports, so they are installed before every read: a TensorStore callback of an
    abandoned read may fire before the failed read's error reaches the caller (seen once in CI)."""
    if not getattr(sys.unraisablehook, "grpo_jax_quiet_reads", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_abandoned_read(unraisable.exc_value):
                previous(unraisable)

        hook.grpo_jax_quiet_reads = True
        sys.unraisablehook = hook
    asyncio_logger = logging.logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAbandonedReads())


def quiet_abandoned_reads() -> None:
    """After a failed array read. Orbax gives up on the other reads of that restore without waiting for
    them, and they report themselves later, each with a traceback and a whole TensorStore spec: closed,
    each raises orbax's "Encountered error while reading array index" wrapper (its `except BaseException`
    also catches GeneratorExit); TensorStore reads finishing after orbax closed its event loop raise
    "Event loop is closed" in their callbacks (both "Exception ignored in ..."); and asyncio logs the
    gathering future's "exception was never retrieved", with orbax's wrapper or TensorStore's bare
    "<CODE>: Error reading ..." ValueError (seen in CI). From now on in this process those, and only
    those, are dropped (`drop_abandoned_read_noise`), and the abandoned reads are collected now: the
    DamagedCheckpointError's one line says what happened."""
    drop_abandoned_read_noise()
    gc.collect()


def json_args(item: str) -> ocp.args.Composite:
    return ocp.args.Composite(**{item: ocp.args.JsonRestore()})


class Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager, except that a damaged `metrics` item (the ranking values, read for
    every step when the manager starts) costs that step its "best" rank with one warning, instead of
    failing the start with a JSON traceback (orbax only tolerates a missing one)."""

    def _get_metrics(self, step: int):
        try:
            return super()._get_metrics(step)
        except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
            warned = self.__dict__.setdefault("_grpo_jax_warned", set())
            if step not in warned:
                warned.add(step)
                logging.warning(
                    "checkpoint step %d in %s: its metrics item is damaged (%s); the step is no longer "
                    "ranked for keep-best",
                    step,
                    self.directory,
                    " ".join(str(error).split())[:200],
                )
            return None

    def close(self):
        """Also wait for the cleanup of unfinished tmp folders that orbax starts in a thread when the
        manager opens and awaits only before a save: a run that stops before saving (every checkpoint
        damaged, a refused resume) would otherwise exit with the thread still running, and it dies
        logging "cannot schedule new futures after shutdown" (seen in CI)."""
        self._maybe_await_cleanup_tmp_directory()
        super().close()


class _DropReadOnlyNotices(logging.logging.Filter):
    """Orbax warns once per option it turns off for a read-only manager; reading is all we want."""

    def filter(self, record):
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


@contextlib.contextmanager
def quiet_read_only():
    quiet = _DropReadOnlyNotices()
    logging.get_absl_logger().addFilter(quiet)
    try:
        yield
    finally:
        logging.get_absl_logger().removeFilter(quiet)


class LatestAndBest(checkpoint_managers.PreservationPolicy):
    """Preserve the newest `keep_last` checkpoints plus the `keep_best` highest-scoring ones.

    Unlike orbax's BestN, a checkpoint without the metric is neither kept forever nor ranked: only
    `keep_last` decides about it.
    """

    def __init__(self, *, keep_last: int, keep_best: int, score):
        self.keep_last, self.keep_best, self.score = keep_last, keep_best, score

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        order = sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step)
        keep = set(order[-self.keep_last :])
        if self.keep_best:
            scored = [(self.score(checkpoints[i].metrics), checkpoints[i].step, i) for i in order]
            scored = sorted(item for item in scored if item[0] is not None)
            keep.update(i for _, _, i in scored[-self.keep_best :])
        return [i in keep for i in range(len(checkpoints))]
