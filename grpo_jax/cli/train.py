"""Train: `python scripts/train.py --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]`.

Runs the config's stages (e.g. SFT then GRPO) and writes DIR/metrics.jsonl, DIR/checkpoints/,
DIR/summary.json, DIR/curves.png and TensorBoard events. Several processes (one per host of a pod, or
local ones): the same command in each, plus --coordinator_address=HOST:PORT --num_processes=N
--process_id=I where jax.distributed cannot find them itself. Re-running the same command resumes, from the
newest checkpoint that reads cleanly (a damaged one gets one warning line and is moved aside).
A bad config key or value, a malformed data file, or a workdir whose checkpoints are all damaged exits
non-zero with one line naming the problem (the last line of stderr, and the only error line).
SIGTERM (a preemption notice on TPU VMs and SLURM) finishes the current step, saves its checkpoint and
exits with code 75 (`trainer.PREEMPTED_EXIT_CODE`) and one `preempted: ...` line; rerun to resume.
--config.compilation_cache_dir=DIR keeps compiled programs in DIR (JAX's persistent compilation cache), so
the next run or resume with the same DIR loads them instead of compiling.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints); reused to resume.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for an explicit multi-process run (every process runs the same command with "
    "its own --process_id). Unset: one process, or a TPU pod / SLURM job found by jax.distributed.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Keep orbax's per-save INFO chatter out of the run log (warnings and errors still show)."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def _fail(message: str) -> None:
    """Exit non-zero with the problem as the last line of stderr, whitespace folded onto one line."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def _unknown_key_message(error: LookupError | AttributeError, argv: list[str]) -> str:
    """ml_collections raises KeyError("'name'\\nDid you mean ...") (maybe inside an AttributeError) for an
    override of a key the config does not have; name the override it came from."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    name, _, hint = text.partition("\n")
    name = name.strip("\"'")
    overrides = [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    matching = [o for o in overrides if name in o.split(".")[1:]]
    where = f"--{matching[0]}: " if matching else ""
    return f"{where}the config has no key {name!r}" + (f" ({hint.strip()})" if hint.strip() else "")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad config file, key or value reported in one line, not a traceback."""
    try:
        args = flags.FLAGS(argv)
    except flags.Error as error:
        text = str(error)
        if "Traceback (most recent call last)" in text:  # get_config() raised: keep its last line
            text = text.split("Traceback")[0] + text.strip().splitlines()[-1]
        _fail(text)
    except (KeyError, AttributeError) as error:
        _fail(_unknown_key_message(error, argv))
    try:
        _CONFIG.value.keys()  # a config file that cannot be read only raises when first used
    except OSError as error:
        _fail(f"--config: {str(error).strip().splitlines()[-1].strip()}")
    return args


def _start_processes() -> bool:
    """Join an explicit multi-process run (--coordinator_address ...); True when this is process 0."""
    given = [_COORDINATOR.value is not None, _NUM_PROCESSES.value is not None, _PROCESS_ID.value is not None]
    if any(given) and not all(given):
        _fail("--coordinator_address, --num_processes and --process_id go together (all three or none)")
    if not all(given):
        return True
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        _fail(f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes={_NUM_PROCESSES.value})")
    import jax

    from grpo_jax import sharding

    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    sharding.initialize_distributed(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    return _PROCESS_ID.value == 0


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    reports = _start_processes()
    from grpo_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted, TrainingError, train

    try:
        summary = train(_CONFIG.value, os.path.abspath(_WORKDIR.value))
    except Preempted as stop:  # every process saved its checkpoint shards; each says so
        print(f"preempted: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ValueError, FileNotFoundError, ImportError, TrainingError) as error:
        # One line, not also logged (which would print it twice). ImportError: an optional dependency
        # the config needs is missing (pyarrow for a Parquet task file).
        _fail(error)
    if not reports:
        return
    for stage, result in summary["stages"].items():
        final, best = result["final_eval_accuracy"], result["best_eval_accuracy"]
        print(f"{stage}: final eval accuracy {final}, best {best}")
    print(f"wall time {summary['wall_time_s']:.0f}s; results in {_WORKDIR.value}")


def entry_point() -> None:
    """The `grpo-train` console entry point (also `python scripts/train.py`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry_point()
