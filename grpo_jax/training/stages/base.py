"""What a stage kind is: how to build its state, its data and its jitted step. The loop is elsewhere.

`grpo_jax.training.trainer` owns the ONE loop (resume, evaluation, checkpoints, metrics, NaN handling,
progress bar, stage results); a stage kind is a small `Stage` subclass registered by name
(tunix-style: one learner loop, thin per-algorithm modules). A stage's name starts with its kind
(`sft`, `sft2`, `grpo_final`, ...) and its metrics lines carry the kind as `stage`.

A stage's life in the loop:

    stage = KIND(run, index)                   # reads config.<name>; nothing allocated
    state, shardings = stage.build(params)     # params: where it starts (see `init_from`)
    [state restored from a checkpoint; stage.data_iter / stage.load_extra_state on resume]
    repeat config.<name>.steps times:
        state, metrics = stage.train_step(state, global_step)
    summary = stage.finish(state)              # e.g. write a dataset; idempotent
    result = stage.result(state)               # what later stages may start from
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import numpy as np

STAGES_DIR = "stages"
STAGE_KINDS: dict[str, type[Stage]] = {}

# The values `config.<stage>.init_from` takes besides an earlier stage's name.
INIT_PREVIOUS, INIT_BASE = "previous", "base"


def stage_dir(workdir: str, name: str) -> str:
    """Where stage `name` keeps its result and the files it writes: `DIR/stages/<name>`."""
    return os.path.join(workdir, STAGES_DIR, name)


def register_stage(kind: str):
    """Class decorator: make `kind` (and stage names starting with it) run with this Stage subclass."""

    def decorate(cls):
        cls.kind = kind
        STAGE_KINDS[kind] = cls
        return cls

    return decorate


def stage_kind(name: str) -> str:
    """ "sft2" -> "sft", "grpo_final" -> "grpo", "rejection_sampling" -> itself (longest matching kind)."""
    matches = [kind for kind in STAGE_KINDS if name.startswith(kind)]
    if not matches:
        raise ValueError(
            f"config.stages: unknown stage {name!r}; stage names start with one of {tuple(STAGE_KINDS)}"
        )
    return max(matches, key=len)


def host_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Stage:
    """Base of the stage kinds. Subclasses set the class attributes and override `build`/`train_step`.

    Class attributes:
      kind: registered name (set by `register_stage`).
      batch_field: the config field holding the global batch size, checked against the mesh up front.
      produces_policy: the result is policy params (evaluated by the run's Evaluator, usable as a later
        stage's start); False for a reward model.
      poisons_gradients: the stage's jitted step reads the `poison_grad` batch key, so
        `config.debug.poison_grad_step` applies to it (see `debug_switches`).
      trains_on_rollouts: the stage trains the policy on its own samples, so its sampling settings
        (temperature, top-p, top-k) are the run's (`grpo_jax.workdir.run_sampling_settings`).
    """

    kind: ClassVar[str] = ""
    batch_field: ClassVar[str | None] = "batch_size"
    produces_policy: ClassVar[bool] = True
    poisons_gradients: ClassVar[bool] = False
    trains_on_rollouts: ClassVar[bool] = False

    def __init__(self, run, index: int):
        self.run = run
        self.index = index
        self.name = run.config.stages[index]
        self.config = run.config[self.name]
        self.data_iter = None
        # The stage whose saved result the state's reference still equals (None: it must be stored);
        # set by the loop, cleared by a reference reset (see `grpo_jax.training.trainer.Run.save`).
        self.reference_from: str | None = None

    # -- validation before anything is written ------------------------------------------------------

    @classmethod
    def validate(cls, config, name: str) -> None:
        """Raise ValueError for a bad stage section (called for every stage before any work)."""

    # -- building -----------------------------------------------------------------------------------

    def build(self, params) -> tuple[Any, Any]:
        """(state, state_shardings) starting from policy-shaped `params`; sets `self.data_iter`."""
        raise NotImplementedError

    def result_template(self):
        """(abstract result pytree, its shardings), to load this stage's saved result from disk."""
        from grpo_jax import models

        shapes = jax.eval_shape(lambda: models.init_params(self.run.model_config, jax.random.key(0)))
        return shapes, models.model_param_shardings(self.run.mesh, self.run.model_config)

    # -- running ------------------------------------------------------------------------------------

    def train_step(self, state, global_step: int) -> tuple[Any, dict]:
        """One step: (new state, host metrics for the metrics.jsonl line)."""
        raise NotImplementedError

    def heldout_metrics(self, state) -> dict[str, float]:
        """Stage-specific held-out numbers added to the step line on eval steps (e.g. SFT loss)."""
        return {}

    def progress(self, metrics: dict) -> dict:
        """Progress-bar postfix from a step's metrics."""
        return {"loss": metrics["loss"]} if "loss" in metrics else {}

    def extra_state(self) -> dict:
        """JSON-able stage state besides the TrainState and data position, saved in each checkpoint."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what `extra_state` saved (called on resume, after the TrainState restore)."""

    def finish(self, state) -> dict:
        """Work at the stage's end (after the last step, before its final checkpoint): returns extra
        entries for this stage in summary.json. Must be idempotent: a resume may run it again."""
        return {}

    def result(self, state):
        """What later stages may start from (policy params, or the reward model's params)."""
        return state.params

    def close(self) -> None:
        """Release resources (host worker pools)."""

    # -- helpers ------------------------------------------------------------------------------------

    def poison(self, global_step: int) -> np.bool_:
        """Debug switch `config.debug.poison_step`: make that global step's loss NaN."""
        return np.bool_(global_step == self.run.config.debug.poison_step)

    def debug_switches(self, global_step: int) -> dict[str, np.bool_]:
        """The debug keys of this step's batch, the same keys every step (one compiled program):
        `poison` (`config.debug.poison_step`: the loss is NaN, caught by `isfinite(loss)`) and, where
        `poisons_gradients`, `poison_grad` (`config.debug.poison_grad_step`: the loss stays finite, its
        gradient is NaN, caught by `isfinite(grad_norm)`); see `grpo_jax.training.state.debug_poison`."""
        switches = {"poison": self.poison(global_step)}
        if self.poisons_gradients:
            poison_grad_step = self.run.config.debug.get("poison_grad_step", -1)
            switches["poison_grad"] = np.bool_(global_step == poison_grad_step)
        return switches

    def state_rng(self):
        return jax.random.key(self.run.config.seed + 1)
