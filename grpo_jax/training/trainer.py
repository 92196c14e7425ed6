"""The training loops: a config's `stages` (e.g. cold-start "sft" then "grpo") run in order, each starting
from the previous stage's final params, with orbax checkpoints, exact resume, metrics and evaluation.

Resume: each checkpoint's `extra` holds the stage, the stage-local step, the data iterator state, the
number of metrics.jsonl lines written so far and the run's fingerprint. Re-running the same command on
the same workdir restores the latest checkpoint, truncates metrics.jsonl back to that point and
continues; every random draw is `fold_in(seed key, step)`, so the steps after a resume reproduce the
uninterrupted run's metrics.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from grpo_jax import sampling, sharding
from grpo_jax.checkpointing import Checkpointer, check_compatible, checkpoint_directory
from grpo_jax.data.pipeline import (
    make_prompt_dataset,
    make_sft_dataset,
    prompt_length_stats,
    sft_length_stats,
)
from grpo_jax.metrics import MetricsWriter, ProgressBar, plot_curves, write_summary
from grpo_jax.rewards import HOST_REWARDS, HostRewardRunner, TokenSpec, make_reward_fns
from grpo_jax.training import setup
from grpo_jax.training.evaluator import Evaluator
from grpo_jax.training.grpo_step import make_grpo_step, rollout_to_batch
from grpo_jax.training.sft_step import make_sft_eval, make_sft_step
from grpo_jax.training.state import (
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    reset_reference,
)

STAGE_KINDS = ("sft", "grpo")


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. too many non-finite updates in a row); the message says why."""


def stage_kind(name: str) -> str:
    """ "sft", "sft2", "grpo_final" -> the loop that runs them."""
    for kind in STAGE_KINDS:
        if name.startswith(kind):
            return kind
    raise ValueError(f"config.stages: unknown stage {name!r}; stage names start with one of {STAGE_KINDS}")


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

    def extra(self, stage_index: int, stage_step: int, **more) -> dict:
        return dict(
            stage_index=stage_index,
            stage=self.config.stages[stage_index],
            stage_step=stage_step,
            metrics_lines=self.metrics.num_lines,
            fingerprint=self.fingerprint,
            history=self.history,
            **more,
        )


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def train(config, workdir: str) -> dict:
    """Run (or resume) every stage of `config` in `workdir`; returns the summary written to summary.json."""
    start_time = time.time()
    stages = list(config.stages)
    if not stages:
        raise ValueError("config.stages is empty")
    for name in stages:
        stage_kind(name)
        if name not in config:
            raise ValueError(f"config.stages names {name!r} but the config has no section config.{name}")
    sharding.initialize_distributed()
    task = setup.build_task(config)
    tokenizer = setup.build_tokenizer(config, task, workdir)
    model_config = setup.build_model_config(config, tokenizer)
    for name in stages:
        if stage_kind(name) == "grpo":
            setup.grpo_config(config[name])
    mesh = setup.build_mesh(config)
    _check_batches_fit_mesh(config, stages, mesh)

    # A resume is refused before anything (config.json included) is written into the old run's workdir.
    fingerprint = setup.fingerprint(model_config, tokenizer)
    checkpointer = Checkpointer(
        checkpoint_directory(workdir),
        keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
    )
    resume = checkpointer.read_extra() if checkpointer.latest_step() is not None else None
    if resume is not None:
        check_compatible(resume["fingerprint"], fingerprint, directory=checkpointer.directory)

    os.makedirs(workdir, exist_ok=True)
    tokenizer_path = os.path.join(workdir, setup.TOKENIZER_FILE)
    if not config.tokenizer.path and not config.model.pretrained and not os.path.exists(tokenizer_path):
        tokenizer.save(tokenizer_path)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("config:\n%s", config)

    metrics = MetricsWriter(workdir, tensorboard=config.tensorboard)
    evaluator = Evaluator(
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
    )
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
        metrics,
        evaluator,
        fingerprint,
        offsets,
        {name: [] for name in stages},
    )

    if resume is not None:
        metrics.truncate_lines(resume["metrics_lines"])
        run.history.update(resume.get("history", {}))
        logging.info(
            "resuming from %s at stage %s step %d",
            checkpointer.directory,
            resume["stage"],
            resume["stage_step"],
        )

    params = setup.initial_params(config, model_config, mesh)
    try:
        for index, name in enumerate(stages):
            if resume is not None and index < resume["stage_index"]:
                continue
            stage_resume = resume if resume is not None and index == resume["stage_index"] else None
            loop = run_sft_stage if stage_kind(name) == "sft" else run_grpo_stage
            params = loop(run, index, params, stage_resume)
            resume = None
    finally:
        checkpointer.wait()
        checkpointer.close()
        metrics.close()

    summary = {"wall_time_s": time.time() - start_time, "stages": {}}
    for name in stages:
        evals = [h["eval/accuracy"] for h in run.history[name]]
        summary["stages"][name] = {
            "final_eval_accuracy": evals[-1] if evals else None,
            "best_eval_accuracy": max(evals) if evals else None,
            "evals": run.history[name],
        }
    write_summary(workdir, summary)
    plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
    return summary


def _check_batches_fit_mesh(config, stages: list[str], mesh) -> None:
    """Training batches are split over the ("data", "fsdp") devices: a size that does not divide fails
    here, before anything is written, rather than at that stage's first step."""
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    sizes = {}
    for name in stages:
        field = "batch_size" if stage_kind(name) == "sft" else "prompts_per_step"
        sizes[f"config.{name}.{field}"] = config[name][field] * jax.process_count()
    bad = [f"{key}={size}" for key, size in sizes.items() if size % data_parallel]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} must be divisible by the data-parallel size {data_parallel} "
            f"(mesh {dict(mesh.shape)})"
        )


# ------------------------------------------------------------------------------------------------
# Shared stage machinery
# ------------------------------------------------------------------------------------------------


def _stage_state(run: Run, params, optimizer, *, with_reference: bool):
    param_shardings = sharding.model_param_shardings(run.mesh, run.model_config)
    return create_train_state(
        params,
        optimizer,
        run.mesh,
        param_shardings,
        rng=jax.random.key(run.config.seed + 1),
        with_reference=with_reference,
    )


def _start_or_resume(run: Run, index: int, state, shardings, data_iter, resume):
    """Restore state and data position when resuming this stage; returns (state, stage_step, extra)."""
    if resume is None:
        return state, 0, {}
    state, extra = run.checkpointer.restore(state, shardings, fingerprint=run.fingerprint)
    data_iter.set_state(extra["data_state"])
    return state, int(extra["stage_step"]), extra


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


def _save(
    run: Run,
    index: int,
    name: str,
    state,
    stage_step: int,
    data_iter,
    *,
    done=False,
    eval_metrics=None,
    nonfinite_in_a_row=0,
):
    extra = run.extra(
        index,
        stage_step,
        data_state=data_iter.get_state(),
        stage_done=done,
        nonfinite_in_a_row=nonfinite_in_a_row,
    )
    run.checkpointer.save(
        run.offsets[name] + stage_step, state, extra=extra, metrics=eval_metrics, force=done
    )


def _check_nonfinite(run: Run, name: str, step_metrics: dict, count: int, stage_step: int) -> int:
    if float(step_metrics["nonfinite_updates"]) > 0:
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


def _host_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _poison(run: Run, global_step: int) -> np.bool_:
    return np.bool_(global_step == run.config.debug.poison_step)


def _end_of_step(run, index, name, state, stage_step, data_iter, m, nonfinite, last_eval, bar, **postfix):
    """Bookkeeping after one step, shared by the stage loops: write the metrics line (before a non-finite
    stop, so its line is kept), stop after too many non-finite updates in a row, evaluate and checkpoint
    on schedule, advance the progress bar. Returns (non-finite count, (last eval step, its metrics))."""
    sc = run.config[name]
    run.metrics.write(run.offsets[name] + stage_step, stage_kind(name), m)
    nonfinite = _check_nonfinite(run, name, m, nonfinite, stage_step)
    eval_metrics = None
    if stage_step % sc.eval_every == 0 or (stage_step == sc.steps and sc.eval_at_end):
        eval_metrics = _evaluate(run, name, state.params, stage_step)
        last_eval = (stage_step, eval_metrics)
        postfix["acc"] = eval_metrics["eval/accuracy"]
    bar.update(1, **postfix)
    if stage_step % sc.checkpoint_every == 0 and stage_step < sc.steps:
        _save(
            run,
            index,
            name,
            state,
            stage_step,
            data_iter,
            eval_metrics=eval_metrics,
            nonfinite_in_a_row=nonfinite,
        )
    return nonfinite, last_eval


def _finish_stage(run, index, name, state, stage_step, data_iter, last_eval, nonfinite):
    """Final eval (unless the loop just ran one) and the stage-done checkpoint, ranked by that eval."""
    last_step, eval_metrics = last_eval
    if last_step != stage_step:
        eval_metrics = (
            _evaluate(run, name, state.params, stage_step) if run.config[name].eval_at_end else None
        )
    _save(
        run,
        index,
        name,
        state,
        stage_step,
        data_iter,
        done=True,
        eval_metrics=eval_metrics,
        nonfinite_in_a_row=nonfinite,
    )


def _restore_finished(run: Run, index: int, state, shardings, resume):
    """The previous run ended this stage: restore its final state and go on to the next stage."""
    state, _ = run.checkpointer.restore(state, shardings, fingerprint=run.fingerprint)
    logging.info("stage %s already finished; continuing from its final params", run.config.stages[index])
    return state.params


# ------------------------------------------------------------------------------------------------
# SFT (cold start)
# ------------------------------------------------------------------------------------------------


def run_sft_stage(run: Run, index: int, params, resume) -> Any:
    config, name = run.config, run.config.stages[index]
    sc = config[name]
    examples = run.task.train[: sc.num_examples] if sc.num_examples else run.task.train
    logging.info(
        "[%s] %s",
        name,
        sft_length_stats(examples, run.tokenizer, template=config.template, max_len=sc.max_len),
    )
    dataset = make_sft_dataset(
        examples,
        run.tokenizer,
        template=config.template,
        max_len=sc.max_len,
        batch_size=sc.batch_size,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    data_iter = iter(dataset)
    opt_config = setup.optimizer_config(sc, sc.steps)
    optimizer = make_optimizer(opt_config)
    state, shardings = _stage_state(run, params, optimizer, with_reference=False)
    if resume is not None and resume.get("stage_done"):
        return _restore_finished(run, index, state, shardings, resume)
    step_fn = make_sft_step(
        run.model_config,
        optimizer,
        mesh=run.mesh,
        state_shardings=shardings,
        lr_schedule=learning_rate_schedule(opt_config),
        chunk_size=config.logprob_chunk_size,
    )
    heldout = next(
        iter(
            make_sft_dataset(
                run.task.test,
                run.tokenizer,
                template=config.template,
                max_len=sc.max_len,
                batch_size=sc.batch_size,
                seed=config.seed,
                shuffle=False,
            )
        )
    )
    heldout = sharding.shard_batch(
        {k: heldout[k] for k in ("tokens", "attention_mask", "loss_mask")}, run.mesh
    )
    heldout_loss = make_sft_eval(run.model_config, chunk_size=config.logprob_chunk_size)
    state, stage_step, extra = _start_or_resume(run, index, state, shardings, data_iter, resume)
    nonfinite = extra.get("nonfinite_in_a_row", 0)
    last_eval = (-1, None)
    with ProgressBar(sc.steps, desc=name, initial=stage_step, disable=not config.progress_bar) as bar:
        while stage_step < sc.steps:
            t0 = time.time()
            batch = next(data_iter)
            global_step = run.offsets[name] + stage_step + 1
            device_batch = sharding.shard_batch(
                {k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}, run.mesh
            )
            device_batch["poison"] = _poison(run, global_step)
            state, step_metrics = step_fn(state, device_batch)
            stage_step += 1
            m = _host_metrics(step_metrics)
            m["step_time_s"] = time.time() - t0
            m["truncated_frac"] = float(np.mean(batch["truncated"]))
            if stage_step % sc.eval_every == 0 or stage_step == sc.steps:
                m.update({f"heldout/{k}": float(v) for k, v in heldout_loss(state.params, heldout).items()})
            nonfinite, last_eval = _end_of_step(
                run, index, name, state, stage_step, data_iter, m, nonfinite, last_eval, bar, loss=m["loss"]
            )
    _finish_stage(run, index, name, state, stage_step, data_iter, last_eval, nonfinite)
    return state.params


# ------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------


def _host_reward_fn(run: Run, stage_config):
    """Weighted Python rewards between sampler and step, or None when the config lists none."""
    specs = [tuple(s) for s in stage_config.host_rewards]
    if not specs:
        return None, None
    unknown = [s[0] for s in specs if s[0] not in HOST_REWARDS]
    if unknown:
        raise ValueError(f"host_rewards: unknown reward(s) {unknown}; known: {sorted(HOST_REWARDS)}")
    runner = HostRewardRunner(
        {s[0]: HOST_REWARDS[s[0]] for s in specs}, timeout_s=stage_config.host_reward_timeout_s
    )
    weights = {s[0]: float(s[1]) for s in specs}

    def compute(rollout, example_index, group_size):
        tokens, mask = jax.device_get((rollout.tokens, rollout.mask))
        eos = run.tokenizer.eos_id
        texts = [
            run.tokenizer.decode([i for i in t[m > 0].tolist() if i != eos]) for t, m in zip(tokens, mask)
        ]
        examples = [run.task.train[int(i)] for i in np.repeat(example_index, group_size)]
        rewards, stats = runner(texts, examples)
        total = sum(weights[k] * v for k, v in rewards.items())
        logged = {f"host_reward/{k}": float(np.mean(v)) for k, v in rewards.items()}
        logged.update(host_reward_errors=stats["num_errors"], host_reward_timeouts=stats["num_timeouts"])
        return np.asarray(total, np.float32), logged

    return compute, runner


def run_grpo_stage(run: Run, index: int, params, resume) -> Any:
    config, name = run.config, run.config.stages[index]
    sc = config[name]
    grpo = setup.grpo_config(sc)
    G = grpo.num_generations
    examples = run.task.train
    logging.info(
        "[%s] %s",
        name,
        prompt_length_stats(
            examples, run.tokenizer, template=config.template, max_prompt_len=config.max_prompt_len
        ),
    )
    dataset = make_prompt_dataset(
        examples,
        run.tokenizer,
        template=config.template,
        max_prompt_len=config.max_prompt_len,
        batch_size=sc.prompts_per_step,
        seed=config.seed + index,
        max_answer_len=config.max_answer_len,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    data_iter = iter(dataset)
    updates_per_step = grpo.num_iterations * grpo.num_minibatches
    opt_config = setup.optimizer_config(sc, sc.steps * updates_per_step)
    optimizer = make_optimizer(opt_config)
    state, shardings = _stage_state(run, params, optimizer, with_reference=grpo.kl_coef > 0)
    if resume is not None and resume.get("stage_done"):
        return _restore_finished(run, index, state, shardings, resume)
    reward_fn = None
    if sc.rewards:  # in-graph rewards need the R1 tags as single tokens; host rewards work on text
        token_spec = TokenSpec.from_tokenizer(run.tokenizer)
        reward_fn = make_reward_fns([tuple(r) for r in sc.rewards], token_spec, tokenizer=run.tokenizer)
    host_rewards, host_runner = _host_reward_fn(run, sc)
    step_fn = make_grpo_step(
        grpo,
        run.model_config,
        optimizer,
        reward_fn=reward_fn,
        mesh=run.mesh,
        state_shardings=shardings,
        lr_schedule=learning_rate_schedule(opt_config),
        logprob_chunk_size=config.logprob_chunk_size,
        grad_accum_steps=sc.get("grad_accum_steps", 1),
    )
    state, stage_step, extra = _start_or_resume(run, index, state, shardings, data_iter, resume)
    nonfinite = extra.get("nonfinite_in_a_row", 0)
    last_eval = (-1, None)
    if stage_step == 0 and sc.eval_at_start:
        last_eval = (0, _evaluate(run, name, state.params, 0))
    try:
        with ProgressBar(sc.steps, desc=name, initial=stage_step, disable=not config.progress_bar) as bar:
            while stage_step < sc.steps:
                t0 = time.time()
                prompts = next(data_iter)
                global_step = run.offsets[name] + stage_step + 1
                placed = sharding.shard_batch(
                    {k: prompts[k] for k in ("prompt_tokens", "prompt_mask", "answer_tokens", "answer_mask")},
                    run.mesh,
                )
                rollout = sampling.generate(
                    run.model_config,
                    state.params,
                    placed["prompt_tokens"],
                    placed["prompt_mask"],
                    jax.random.fold_in(state.rng, state.step),
                    num_samples=G,
                    max_new_tokens=config.max_new_tokens,
                    temperature=grpo.temperature,
                    top_p=sc.top_p,
                    top_k=sc.top_k,
                    eos_id=run.tokenizer.eos_id,
                    pad_id=run.tokenizer.pad_id,
                    mesh=run.mesh,
                )
                jax.block_until_ready(rollout.tokens)
                sample_time = time.time() - t0
                host_values, host_logged = (None, {})
                if host_rewards is not None:
                    host_values, host_logged = host_rewards(rollout, prompts["example_index"], G)
                batch = rollout_to_batch(rollout, placed, G, host_values)
                batch["poison"] = _poison(run, global_step)
                state, step_metrics = step_fn(state, batch)
                stage_step += 1
                if grpo.reference_reset_every and stage_step % grpo.reference_reset_every == 0:
                    state = reset_reference(state)
                m = _host_metrics(step_metrics)
                m.update(
                    host_logged,
                    sample_time_s=sample_time,
                    step_time_s=time.time() - t0,
                    prompt_truncated_frac=float(np.mean(prompts["prompt_truncated"])),
                )
                nonfinite, last_eval = _end_of_step(
                    run,
                    index,
                    name,
                    state,
                    stage_step,
                    data_iter,
                    m,
                    nonfinite,
                    last_eval,
                    bar,
                    reward=m["reward/mean"],
                    kl=m["kl"],
                )
        _finish_stage(run, index, name, state, stage_step, data_iter, last_eval, nonfinite)
    finally:
        if host_runner is not None:
            host_runner.close()
    return state.params
