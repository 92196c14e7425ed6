"""Train: `python scripts/train.py --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]`.

Runs the config's stages (e.g. SFT then GRPO) and writes DIR/metrics.jsonl, DIR/checkpoints/,
DIR/summary.json, DIR/curves.png and TensorBoard events. Re-running the same command resumes.
A bad config key or value, or a malformed data file, exits non-zero with one line naming the problem.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints); reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Keep orbax's per-save INFO chatter out of the run log (warnings and errors still show)."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from grpo_jax.training.trainer import TrainingError, train

    try:
        summary = train(_CONFIG.value, os.path.abspath(_WORKDIR.value))
    except (ValueError, FileNotFoundError, TrainingError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for stage, result in summary["stages"].items():
        print(f"{stage}: final eval accuracy {result['final_eval_accuracy']}, best {result['best_eval_accuracy']}")
    print(f"wall time {summary['wall_time_s']:.0f}s; results in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
