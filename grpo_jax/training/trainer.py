"""The ONE stage loop: a config's `stages` run in order (e.g. the R1 pipeline: cold-start `sft` → `grpo`
→ `rejection_sampling` → `rm` → `sft2` → `grpo_final`), with orbax checkpoints, exact resume, metrics,
evaluation, a non-finite guard and a progress bar, the same for every stage kind. What differs between
kinds (state, data, jitted step) lives in `grpo_jax.training.stages`, registered by name.

Where a stage starts (`config.<stage>.init_from`): "previous" (default: the previous stage's result),
"base" (the run's initial model: pretrained weights or the seeded random init), or an earlier stage's
name. Each finished stage's result (policy or reward-model params) is saved under
`DIR/stages/<name>/result`, so later stages (and resumes) can start from any of them; stages may also
write datasets there (`DIR/stages/<name>/sft.jsonl`), which later stages read with `data="stage:<name>"`.

Resume: each checkpoint's `extra` holds the stage, the stage-local step, the data iterator state, the
stage's own extra state, the number of metrics.jsonl lines written so far and the run's fingerprint.
Re-running the same command on the same workdir restores the latest checkpoint, truncates metrics.jsonl
back to that point and continues; every random draw is `fold_in(seed key, step)`, so the steps after a
resume reproduce the uninterrupted run's metrics. A checkpoint that does not read cleanly (a file
missing or truncated) is named in one warning line, moved to `<step>.damaged`, and the next older one is
used; when none is left, the run stops with one error line naming the folder (it never starts over
on top of the old metrics).

Preemption (TPU VMs and SLURM send SIGTERM first): while `train` runs, SIGTERM only sets a flag; the loop
finishes the current step, every process agrees to stop at that same step (a one-value all-gather per step
when there are several processes, so no process saves alone), saves that step's checkpoint, waits for it
and raises `Preempted`; `scripts/train.py` then exits with `PREEMPTED_EXIT_CODE` and one line. The same
command resumes from that checkpoint. The handler is installed by `train` and the previous one restored
when it returns (`stop_on_sigterm`), never at import.

Every training line of metrics.jsonl also carries `compiles`: the XLA compilations this process has
done so far (`compilation.compile_count`; programs loaded from the persistent compilation cache are not
compilations), so a program that recompiles every step shows as a growing count. It restarts in a
resumed process, unlike every other value of the line. `config.compilation_cache_dir` (top level, ""
= off) turns on JAX's persistent compilation cache there, for every program, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from grpo_jax import sharding
from grpo_jax.checkpointing import (
    Checkpointer,
    DamagedCheckpointError,
    check_compatible,
    checkpoint_directory,
)
from grpo_jax.metrics import MetricsWriter, ProgressBar, plot_curves, write_summary
from grpo_jax.training import setup
from grpo_jax.training.compilation import compile_count, enable_persistent_cache
from grpo_jax.training.evaluator import Evaluator
from grpo_jax.training.preemption import (  # noqa: F401 (PREEMPTED_EXIT_CODE: the trainer's API)
    PREEMPTED_EXIT_CODE,
    Preempted,
    stop_agreed,
    stop_on_sigterm,
)
from grpo_jax.training.stages import INIT_BASE, INIT_PREVIOUS, STAGE_KINDS, stage_kind
from grpo_jax.training.stages.base import stage_dir
from grpo_jax.training.state import state_bytes


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. too many non-finite updates in a row); the message says why."""


@dataclasses.dataclass
class Run:
    """What every stage shares: config, workdir, data, tokenizer, model, mesh, writers."""

    config: Any
    workdir: str
    task: setup.TaskData
    tokenizer: Any
    model_config: Any
    mesh: Any
    checkpointer: Checkpointer
    metrics: MetricsWriter
    evaluator: Evaluator
    fingerprint: dict
    offsets: dict  # stage name -> global step at its start
    history: dict  # stage name -> list of eval metric dicts (for summary.json)
    stage_summaries: dict = dataclasses.field(default_factory=dict)  # stage name -> its finish() entries
    load_base: Any = None  # () -> the run's initial model (pretrained weights or the seeded init)
    base: Any = None  # that model while a stage may still start from it (see `base_params`)
    # `config.sampler_mesh`'s own mesh, where RL stages decode (None: co-located on `mesh`)
    sampler_mesh: Any = None
    previous: tuple | None = None  # (stage name, result) of the last stage run in this process
    stop_requested: threading.Event | None = None  # set by SIGTERM (see `stop_on_sigterm`)

    def stage(self, name: str):
        return STAGE_KINDS[stage_kind(name)](self, list(self.config.stages).index(name))

    # -- stage results -------------------------------------------------------------------------------

    def save_result(self, name: str, result) -> None:
        path = os.path.join(stage_dir(self.workdir, name), "result")
        with (
            ocp.StandardCheckpointer() as checkpointer
        ):  # force: a resume that re-finishes a stage rewrites it
            checkpointer.save(path, result, force=True)
            checkpointer.wait_until_finished()

    def load_result(self, name: str):
        """(params, shardings) of finished stage `name`, read from `DIR/stages/<name>/result`."""
        if self.previous is not None and self.previous[0] == name:
            stage = self.stage(name)
            return self.previous[1], stage.result_template()[1]
        template, shardings = self.stage(name).result_template()
        path = os.path.join(stage_dir(self.workdir, name), "result")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path}: stage {name!r} has no saved result; was it run in this workdir?"
            )
        target = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), template, shardings
        )
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target), shardings

    def start_source(self, index: int) -> str | None:
        """The stage whose result stage `index` starts from (`config.<stage>.init_from`); None: the run's
        initial model."""
        name = self.config.stages[index]
        source = self.config[name].get("init_from", INIT_PREVIOUS)
        if source == INIT_BASE or (source == INIT_PREVIOUS and index == 0):
            return None
        return self.config.stages[index - 1] if source == INIT_PREVIOUS else source

    def init_params(self, index: int):
        """The policy params stage `index` starts from (`config.<stage>.init_from`)."""
        source = self.start_source(index)
        if source is None:
            return self.base_params()
        return self.load_result(source)[0]  # a policy stage: validate_stages checked it

    def base_params(self):
        """The run's initial model, loaded on first use."""
        if self.base is None:
            self.base = self.load_base()
        return self.base

    def release_start_params(self, built_index: int) -> None:
        """Once stage `built_index` is built, drop what only a stage's start needed: the initial model when
        no later stage starts from it, and the previous stage's result (a later stage reads it from disk).
        Each is a whole model's worth of device memory the rest of the run would otherwise hold."""
        if all(self.start_source(i) is not None for i in range(built_index + 1, len(self.config.stages))):
            self.base = None
        self.previous = None

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self, stage, state, stage_step: int, *, done=False, eval_metrics=None, nonfinite=0):
        """Checkpoint the stage at `stage_step`. While the reference still equals the result the stage
        started from (`stage.reference_from`: no reference reset yet), it is not stored again: the
        checkpoint's extra names that stage and a resume rebuilds the reference from its saved result."""
        reference_from = stage.reference_from if state.ref_params is not None else None
        if reference_from is not None:
            state = state.replace(ref_params=None)
        # A LoRA stage's base is never stored (TrainState.base is not a checkpointed field): the
        # checkpoint names where it comes from and its fingerprint instead.
        lora = {"lora": stage.lora_checkpoint_info()} if stage.lora is not None else {}
        extra = dict(
            stage_index=stage.index,
            stage=stage.name,
            stage_step=stage_step,
            metrics_lines=self.metrics.num_lines,
            fingerprint=self.fingerprint,
            history=self.history,
            stage_summaries=self.stage_summaries,
            data_state=stage.data_iter.get_state() if stage.data_iter is not None else None,
            stage_state=stage.extra_state(),
            stage_done=done,
            nonfinite_in_a_row=nonfinite,
            reference_from=reference_from,
            **lora,
        )
        self.checkpointer.save(
            self.offsets[stage.name] + stage_step, state, extra=extra, metrics=eval_metrics, force=done
        )


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def validate_stages(config) -> list[str]:
    """Stage names, kinds and sections checked before anything is written."""
    stages = list(config.stages)
    if not stages:
        raise ValueError("config.stages is empty")
    if len(set(stages)) != len(stages):
        raise ValueError(f"config.stages names a stage twice: {stages}")
    for index, name in enumerate(stages):
        stage_kind(name)
        if name not in config:
            raise ValueError(f"config.stages names {name!r} but the config has no section config.{name}")
        source = config[name].get("init_from", INIT_PREVIOUS)
        if source not in (INIT_PREVIOUS, INIT_BASE) and source not in stages[:index]:
            raise ValueError(
                f"config.{name}.init_from={source!r}: expected 'previous', 'base' or an earlier stage "
                f"of {stages[:index]}"
            )
        setup.check_stage_lora(config, name, STAGE_KINDS[stage_kind(name)].trains_weights)
        if source == INIT_PREVIOUS and index > 0:
            source = stages[index - 1]
        if (
            source != INIT_BASE
            and source != INIT_PREVIOUS
            and not STAGE_KINDS[stage_kind(source)].produces_policy
        ):
            raise ValueError(
                f"stage {name!r} would start from {source!r}, whose result is a reward model, not a policy; "
                f"set config.{name}.init_from to 'base' or a policy stage"
            )
    return stages


def train(config, workdir: str) -> dict:
    """Run (or resume) every stage of `config` in `workdir`; returns the summary written to summary.json.

    Raises `Preempted` after saving a checkpoint when SIGTERM arrives (module docstring)."""
    with stop_on_sigterm() as stop_requested:
        return _train(config, workdir, stop_requested)


def _train(config, workdir: str, stop_requested: threading.Event) -> dict:
    start_time = time.time()
    enable_persistent_cache(config.get("compilation_cache_dir", ""))
    stages = validate_stages(config)
    setup.sampler_fn(config)  # config.sampler / config.engine checked before anything is written
    sharding.initialize_distributed()
    task = setup.build_task(config)
    tokenizer = setup.build_tokenizer(config, task, workdir)
    model_config = setup.build_model_config(config, tokenizer)
    mesh, sampler_mesh = setup.build_meshes(config)  # the sampler's own mesh with config.sampler_mesh
    for name in stages:
        STAGE_KINDS[stage_kind(name)].validate(config, name)
    if any(stage_kind(name) == "sft" for name in stages):  # a cold start trains on the demonstrations
        setup.check_tool_demonstrations(config, stages, task, tokenizer)
    _check_batches_fit_mesh(config, stages, mesh)

    # A resume is refused before anything (config.json included) is written into the old run's workdir.
    fingerprint = setup.fingerprint(model_config, tokenizer)
    checkpointer = Checkpointer(
        checkpoint_directory(workdir),
        keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
    )
    run = None
    try:  # from here on, whatever stops the run closes the checkpointer (no orbax thread left behind)
        resume = _resume_point(checkpointer, fingerprint)

        offsets, total = {}, 0
        for name in stages:
            offsets[name] = total
            total += config[name].steps
        run = Run(
            config,
            workdir,
            task,
            tokenizer,
            model_config,
            mesh,
            checkpointer,
            None,
            None,
            fingerprint,
            offsets,
            {name: [] for name in stages},
            stop_requested=stop_requested,
            sampler_mesh=sampler_mesh,
        )
        os.makedirs(workdir, exist_ok=True)
        tokenizer_path = os.path.join(workdir, setup.TOKENIZER_FILE)
        if jax.process_index() == 0:  # the run's files come from one process (all build the same)
            if (
                not config.tokenizer.path
                and not config.model.pretrained
                and not os.path.exists(tokenizer_path)
            ):
                tokenizer.save(tokenizer_path)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        logging.info("config:\n%s", config)

        run.metrics = MetricsWriter(workdir, tensorboard=config.tensorboard)
        run.evaluator = Evaluator(
            model_config,
            tokenizer,
            task.test[: config.eval.num_problems],
            template=config.template,
            max_prompt_len=config.max_prompt_len,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.eval.batch_size,
            k=config.eval.k,
            temperature=config.eval.temperature,
            correct_fn=task.correctness,
            mesh=mesh,
            generate_fn=setup.eval_generate_fn(config, tokenizer),
        )
        run.load_base = lambda: setup.initial_params(config, model_config, mesh)
        while True:
            _start_from(run, resume)
            try:
                for index in range(len(stages)):
                    if resume is not None and index < resume["stage_index"]:
                        continue
                    stage_resume = resume if resume is not None and index == resume["stage_index"] else None
                    run_stage(run, index, stage_resume)
                    resume = None
                    if index + 1 < len(stages) and stop_agreed(run.stop_requested):
                        _stop_preempted(run, stages[index], config[stages[index]].steps)
                break
            except DamagedCheckpointError as error:  # the resumed stage's restore of its arrays
                if resume is None or (error.directory, error.step) != (
                    checkpointer.directory,
                    resume["checkpoint_step"],
                ):
                    raise
                _set_aside(checkpointer, error)
                resume = _resume_point(checkpointer, fingerprint)
    finally:
        checkpointer.wait()
        checkpointer.close()
        if run is not None and run.metrics is not None:
            run.metrics.close()

    summary = {"wall_time_s": time.time() - start_time, "stages": {}}
    for name in stages:
        evals = [h["eval/accuracy"] for h in run.history[name]]
        summary["stages"][name] = {
            "kind": stage_kind(name),
            "final_eval_accuracy": evals[-1] if evals else None,
            "best_eval_accuracy": max(evals) if evals else None,
            "evals": run.history[name],
            **run.stage_summaries.get(name, {}),
        }
    if jax.process_index() == 0:
        write_summary(workdir, summary)
        plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
    return summary


# What the loop reads from a checkpoint's extra; one without them is damaged, not a different format.
_RESUME_KEYS = ("stage_index", "stage", "stage_step", "metrics_lines", "fingerprint")


def _resume_point(checkpointer: Checkpointer, fingerprint: dict) -> dict | None:
    """The newest checkpoint's `extra` (plus its `checkpoint_step`) whose JSON items read cleanly, checked
    against the run's fingerprint; None for a fresh run. Its arrays are read (and found damaged or not)
    when its stage restores it; a finished stage's are not needed. Damaged ones are named in one warning
    line each and set aside; a folder whose checkpoints are all damaged stops the run instead of
    restarting it on top of the old metrics."""
    for step in reversed(checkpointer.all_steps()):
        try:
            extra = checkpointer.read_extra(step)
            checkpointer.read_meta(step)
            missing = [key for key in _RESUME_KEYS if key not in extra]
            if missing:
                raise DamagedCheckpointError(
                    step, checkpointer.directory, f"extra: has no {', '.join(missing)}"
                )
        except DamagedCheckpointError as error:
            _set_aside(checkpointer, error)
            continue
        check_compatible(extra["fingerprint"], fingerprint, directory=checkpointer.directory)
        return dict(extra, checkpoint_step=step)
    damaged = checkpointer.set_aside_folders()
    if damaged:
        raise TrainingError(
            f"no intact checkpoint to resume from in {checkpointer.directory}: the damaged ones were moved "
            f"to {', '.join(damaged)}; repair and rename one back, or use a new --workdir"
        )
    return None


def _set_aside(checkpointer: Checkpointer, error: DamagedCheckpointError) -> None:
    moved = checkpointer.set_aside(error.step)
    logging.warning("%s; moved it to %s and trying the previous checkpoint", error, moved.name)


def _start_from(run: Run, resume: dict | None) -> None:
    """Reset what the run carries between stages to `resume` (a checkpoint's extra) or a fresh start."""
    run.history = {name: [] for name in run.config.stages}
    run.stage_summaries, run.previous = {}, None
    if resume is None:
        return
    run.metrics.truncate_lines(resume["metrics_lines"])
    run.history.update(resume.get("history", {}))
    run.stage_summaries.update(resume.get("stage_summaries", {}))
    logging.info(
        "resuming from %s at stage %s step %d",
        run.checkpointer.directory,
        resume["stage"],
        resume["stage_step"],
    )


def _check_batches_fit_mesh(config, stages: list[str], mesh) -> None:
    """Training batches are split over the ("data", "fsdp") devices: a size that does not divide fails
    here, before anything is written, rather than at that stage's first step."""
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    sizes = {}
    for name in stages:
        field = STAGE_KINDS[stage_kind(name)].batch_field
        if field is not None:
            sizes[f"config.{name}.{field}"] = config[name][field]  # global batch, all processes
    bad = [f"{key}={size}" for key, size in sizes.items() if size % data_parallel]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} must be divisible by the data-parallel size {data_parallel} "
            f"(mesh {dict(mesh.shape)})"
        )


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def _evaluate(run: Run, name: str, params, stage_step: int) -> dict:
    t0 = time.time()
    result = run.evaluator(params, jax.random.key(run.config.seed + 7))
    result["eval/time_s"] = time.time() - t0
    result["train_stage"] = name
    global_step = run.offsets[name] + stage_step
    run.metrics.write(global_step, "eval", result)
    run.history[name].append({"step": global_step, **{k: v for k, v in result.items() if k != "train_stage"}})
    logging.info("[%s] step %d eval: %s", name, stage_step, {k: v for k, v in result.items() if "/" in k})
    return result


def _check_nonfinite(run: Run, name: str, step_metrics: dict, count: int, stage_step: int) -> int:
    if float(step_metrics.get("nonfinite_updates", 0.0)) > 0:
        count += 1
        logging.warning(
            "[%s] step %d: non-finite loss or gradient, update skipped (%d in a row)", name, stage_step, count
        )
        if count >= run.config.max_nonfinite_in_a_row:
            raise TrainingError(
                f"stage {name!r} stopped at step {stage_step}: {count} non-finite updates in a row "
                f"(config.max_nonfinite_in_a_row={run.config.max_nonfinite_in_a_row}); "
                "lower the learning rate "
                f"or check the data. The last good checkpoint in {run.checkpointer.directory} is kept."
            )
        return count
    return 0


def _stop_preempted(run: Run, name: str, stage_step: int) -> None:
    """Wait for the checkpoint of stage `name`'s step `stage_step` (just saved) and raise `Preempted`
    naming the resume point: the newest checkpoint (an older one if this step's was refused)."""
    run.checkpointer.wait()
    step = run.checkpointer.latest_step()
    point = (
        f"checkpoint {step} in {run.checkpointer.directory} is the resume point"
        if step is not None
        else f"no checkpoint in {run.checkpointer.directory} yet, so a rerun starts over"
    )
    raise Preempted(
        f"SIGTERM received; stopped after step {stage_step} of stage {name} (global step "
        f"{run.offsets[name] + stage_step}); {point}; rerun the same command to continue",
        step,
    )


def run_stage(run: Run, index: int, resume: dict | None) -> None:
    """Build stage `index`, restore it on resume, step it to `config.<stage>.steps` with metrics, evals
    and checkpoints on schedule, then finish it: final eval, its result saved, the stage-done checkpoint."""
    name = run.config.stages[index]
    stage = run.stage(name)
    sc = stage.config
    if resume is not None and resume.get("stage_done"):
        if int(resume["stage_step"]) >= sc.steps:
            logging.info("stage %s already finished", name)
            run.previous = None  # later stages load its result from disk
            return
        logging.info(  # the run is being extended: continue this stage from its final state
            "stage %s finished at step %d; extending it to config.%s.steps=%d",
            name,
            resume["stage_step"],
            name,
            sc.steps,
        )
    evaluates = stage.produces_policy
    try:
        state, shardings = stage.build(run.init_params(index))
        run.release_start_params(index)
        # With LoRA a stored reference is adapters of its own, never equal to the start's result.
        equals_start = state.ref_params is not None and state.base is None
        stage.reference_from = run.start_source(index) if equals_start else None
        stage.set_base(state)
        stage_step, nonfinite = 0, 0
        if resume is not None:
            stage.check_resume(resume)
            # A reference the checkpoint did not store (see `Run.save`) is the one just built from the
            # stage's start; anything else comes from the checkpoint.
            stage.reference_from = resume.get("reference_from")
            stored = state if stage.reference_from is None else state.replace(ref_params=None)
            restored, extra = run.checkpointer.restore(
                stored,
                shardings if stage.reference_from is None else shardings.replace(ref_params=None),
                resume["checkpoint_step"],
                fingerprint=run.fingerprint,
            )
            state = (
                restored if stage.reference_from is None else restored.replace(ref_params=state.ref_params)
            )
            if stage.data_iter is not None and extra.get("data_state") is not None:
                stage.data_iter.set_state(extra["data_state"])
            stage.load_extra_state(extra.get("stage_state") or {})
            stage_step, nonfinite = int(extra["stage_step"]), extra.get("nonfinite_in_a_row", 0)
        last_eval = (-1, None)
        if stage_step == 0 and evaluates and sc.get("eval_at_start", False):
            last_eval = (0, _evaluate(run, name, stage.sampler_params(state), 0))
        eval_every = sc.get("eval_every", 0)
        with ProgressBar(sc.steps, desc=name, initial=stage_step, disable=not run.config.progress_bar) as bar:
            while stage_step < sc.steps:
                global_step = run.offsets[name] + stage_step + 1
                state, m = stage.train_step(state, global_step)
                stage_step += 1
                eval_now = (eval_every and stage_step % eval_every == 0) or (
                    stage_step == sc.steps and sc.get("eval_at_end", True)
                )
                if eval_now:
                    m.update(stage.heldout_metrics(state))
                m["compiles"] = compile_count()
                run.metrics.write(global_step, stage.kind, m)
                nonfinite = _check_nonfinite(run, name, m, nonfinite, stage_step)
                eval_metrics, postfix = None, stage.progress(m)
                if eval_now and evaluates:
                    eval_metrics = _evaluate(run, name, stage.sampler_params(state), stage_step)
                    last_eval = (stage_step, eval_metrics)
                    postfix["acc"] = eval_metrics["eval/accuracy"]
                bar.update(1, **postfix)
                if stage_step % sc.checkpoint_every == 0 and stage_step < sc.steps:
                    run.save(stage, state, stage_step, eval_metrics=eval_metrics, nonfinite=nonfinite)
                # After the last step the stage finishes first (its final checkpoint is the done one).
                if stage_step < sc.steps and stop_agreed(run.stop_requested):
                    # A no-op when the schedule just saved this step.
                    run.save(stage, state, stage_step, eval_metrics=eval_metrics, nonfinite=nonfinite)
                    _stop_preempted(run, name, stage_step)
        eval_metrics = last_eval[1]
        if last_eval[0] != stage_step:
            eval_metrics = (
                _evaluate(run, name, stage.sampler_params(state), stage_step)
                if evaluates and sc.get("eval_at_end", True)
                else None
            )
        run.stage_summaries[name] = dict(stage.finish(state), train_state_bytes=state_bytes(state))
        result = stage.result(state)
        run.save_result(name, result)
        stage.save_adapters(state)
        run.save(stage, state, stage_step, done=True, eval_metrics=eval_metrics, nonfinite=nonfinite)
        run.previous = (name, result)
    finally:
        stage.close()
