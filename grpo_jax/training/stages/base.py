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

LoRA (`config.<name>.lora=True`, `grpo_jax.models.lora`): `trainable_start` turns the start params into
the adapters the optimizer trains and the frozen base (`TrainState.base`); `policy_params` (what the
step functions' model calls see), `sampler_params` (merged once per rollout or attached, per
`config.lora.sampler_weights`) and `result` (the merged policy, so every reader of a stage result and
every later stage sees plain model params) hide the difference from the loop.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import numpy as np

from grpo_jax.models import lora as lora_lib
from grpo_jax.training import setup
from grpo_jax.training.state import policy_params

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
      trains_weights: the stage updates weights, so `config.<name>.lora` may put it on adapters.
    """

    kind: ClassVar[str] = ""
    batch_field: ClassVar[str | None] = "batch_size"
    produces_policy: ClassVar[bool] = True
    poisons_gradients: ClassVar[bool] = False
    trains_on_rollouts: ClassVar[bool] = False
    trains_weights: ClassVar[bool] = True

    def __init__(self, run, index: int):
        self.run = run
        self.index = index
        self.name = run.config.stages[index]
        self.config = run.config[self.name]
        self.data_iter = None
        # The stage whose saved result the state's reference still equals (None: it must be stored);
        # set by the loop, cleared by a reference reset (see `grpo_jax.training.trainer.Run.save`).
        self.reference_from: str | None = None
        # config.lora when config.<name>.lora is True; the base's fingerprint is set by the loop.
        self.lora = setup.stage_lora(run.config, self.name) if self.trains_weights else None
        self.base_fingerprint: str | None = None
        self._mergers: dict = {}

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
        """What later stages may start from (policy params, or the reward model's params); with LoRA the
        merged weights in the model's weight dtype, so every reader of a result sees plain params."""
        if state.base is None:
            return state.params
        return self.merger(self.run.model_config.weight_dtype, cast_rest=True)(state.base, state.params)

    # -- LoRA ---------------------------------------------------------------------------------------

    attach_fn = staticmethod(lora_lib.attach)  # how the trainable params sit on the base

    def trainable_start(self, params) -> tuple[Any, Any, dict]:
        """(trainable params, their shardings, `create_train_state`'s base arguments) from policy-shaped
        start `params`: the params themselves, or with LoRA fresh adapters (A random, B zero) over
        `params` frozen as the base (stored in `config.lora.base_dtype`)."""
        run = self.run
        shardings = self.model_shardings()
        if self.lora is None:
            return params, shardings, {}
        adapters = lora_lib.init_sharded_adapters(run.model_config, self.lora, self.adapter_rng(), run.mesh)
        scale = self.lora.scale
        return (
            adapters,
            lora_lib.adapter_shardings(run.mesh, run.model_config, self.lora),
            dict(
                base=lora_lib.FrozenBase(params, scale),
                base_shardings=lora_lib.FrozenBase(shardings, scale),
                base_dtype=self.lora.base_dtype,
            ),
        )

    def model_shardings(self):
        from grpo_jax import models

        return models.model_param_shardings(self.run.mesh, self.run.model_config)

    def adapter_rng(self):
        """The key of this stage's fresh adapters (A's random init)."""
        return jax.random.fold_in(jax.random.key(self.run.config.seed + 5), self.index)

    def merger(self, dtype, *, cast_rest: bool = False) -> lora_lib.Merger:
        """One jitted merge per setting, built on first use (see `lora.Merger`)."""
        key = (str(dtype), cast_rest)
        if key not in self._mergers:
            self._mergers[key] = lora_lib.Merger(dtype, attach_fn=self.attach_fn, cast_rest=cast_rest)
        return self._mergers[key]

    def policy_params(self, state):
        """The params the model functions take for this stage's policy (with LoRA: adapters attached)."""
        return policy_params(state)

    def sampler_params(self, state):
        """What the sampler decodes with: the policy params; with LoRA the weights merged once (in the
        compute dtype, `config.lora.sampler_weights="merged"`) or the base with the adapters attached
        ("adapters": x·A·B at every token, no copy)."""
        if state.base is None:
            return state.params
        if self.lora.sampler_weights == "adapters":
            return self.policy_params(state)
        return self.merger(self.run.model_config.compute_dtype)(state.base, state.params)

    def set_base(self, state) -> None:
        """After `build`: record the fingerprint of the state's LoRA base (what checkpoints carry)."""
        self.base_fingerprint = None if state.base is None else lora_lib.fingerprint(state.base.params)

    def check_resume(self, extra: dict) -> None:
        """Refuse, in one line, a checkpoint whose adapters do not belong to this stage as configured: LoRA
        on one side only, another rank/alpha/targets/base dtype, or another base (its fingerprint)."""
        saved, where = extra.get("lora"), f"checkpoint {extra.get('checkpoint_step')} of stage {self.name!r}"
        if saved is None and self.lora is None:
            return
        if saved is None or self.lora is None:
            has = "trains every weight" if saved is None else "holds LoRA adapters"
            raise ValueError(
                f"{where} {has} but config.{self.name}.lora={self.lora is not None}; restore the config "
                "or use a new --workdir"
            )
        mine = self.lora.to_dict()
        changed = [k for k in ("rank", "alpha", "targets", "base_dtype") if saved["config"].get(k) != mine[k]]
        if changed:
            diffs = ", ".join(f"{k}={saved['config'].get(k)!r} (now {mine[k]!r})" for k in changed)
            raise ValueError(
                f"{where} was trained with config.lora {diffs}; restore it or use a new --workdir"
            )
        if saved["base_fingerprint"] != self.base_fingerprint:
            source = saved.get("base_from") or "the run's initial model"
            raise ValueError(
                f"{where}: its adapters were trained on a base with fingerprint {saved['base_fingerprint']}, "
                f"but the base built now from {source} has {self.base_fingerprint}: the weights the stage "
                "starts from changed; restore them or use a new --workdir"
            )

    def save_adapters(self, state) -> None:
        """A LoRA policy stage's adapters as a PEFT directory, `DIR/stages/<name>/adapter` (beside its
        merged `result`): `peft` loads it onto the Hugging Face base when the stage started from the run's
        pretrained model (`adapter_config.json` names it), and `load_peft_adapter` reads it back."""
        if self.lora is None or not self.produces_policy:
            return
        from grpo_jax import sharding

        adapters = sharding.to_host(state.params)  # a collective: every process fetches
        if jax.process_index() != 0:
            return
        source = self.run.start_source(self.index)
        base_model = self.run.config.model.pretrained if source is None else ""
        lora_lib.save_peft_adapter(
            self.lora,
            adapters,
            os.path.join(stage_dir(self.run.workdir, self.name), "adapter"),
            base_model=base_model,
            model_config=self.run.model_config,
            base_from=f"stages/{source}/result" if source is not None else "the run's initial model",
            base_fingerprint=self.base_fingerprint,
        )

    def lora_checkpoint_info(self) -> dict | None:
        """What a LoRA stage's checkpoints record (None without LoRA): the adapter setting, the stage
        whose result is the base (None: the run's initial model) and the base's fingerprint."""
        if self.lora is None:
            return None
        return {
            "config": self.lora.to_dict(),
            "base_from": self.run.start_source(self.index),
            "base_fingerprint": self.base_fingerprint,
        }

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
