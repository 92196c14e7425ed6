"""From an ml_collections config to the pieces a run needs: tokenizer, task splits, model, mesh.

Everything here validates before anything is written to the workdir, so a bad config or data file
fails with one clear message and leaves nothing that a resume would trust.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import os
from typing import Any

import jax

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.data.files import load_jsonl_task
from grpo_jax.data.tasks import TASKS
from grpo_jax.data.templates import format_prompt
from grpo_jax.inputs import canonical_dtype
from grpo_jax.models.config import RUNTIME_FIELDS
from grpo_jax.models.lora import LoRAConfig
from grpo_jax.rollout import engine as rollout_engine
from grpo_jax.tokenizers import load_tokenizer, train_sentencepiece
from grpo_jax.training.state import OptimizerConfig

TOKENIZER_FILE = "tokenizer.model"
SAMPLERS = ("static", "engine")


def _plain(value):
    """ConfigDict / tuples -> plain Python containers."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


@dataclasses.dataclass
class TaskData:
    name: str
    train: list[dict]
    test: list[dict]
    correctness: str  # key of grpo_jax.training.evaluator.CORRECTNESS


def _check_task_kwargs(name: str, factory, kwargs: dict, reserved: tuple[str, ...]) -> None:
    """One clear error for `config.task.kwargs` keys the task does not take (e.g. a synthetic task's
    `num_digits` left over after switching `config.task.name` to a JSONL task)."""
    accepted = sorted(set(inspect.signature(factory).parameters) - set(reserved))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"config.task.kwargs: {unknown} are not options of task {name!r} (accepted: {accepted})"
        )


def task_seed(config) -> int:
    """The seed that draws a synthetic task's problems: `config.task.seed`, or the run's `config.seed`
    when it is absent or negative. Fixing it keeps the problem set (and the held-out split) while the
    run's seed still varies the initialisation, batch order and sampling."""
    seed = config.task.get("seed", -1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"config.task.seed={seed!r}: expected an int (negative: the run's config.seed)")
    return config.seed if seed < 0 else seed


def build_task(config) -> TaskData:
    """Synthetic task from `TASKS` or a JSONL file task; train and held-out splits never overlap."""
    task = config.task
    if task.name in TASKS:
        kwargs = _plain(task.kwargs)
        _check_task_kwargs(task.name, TASKS[task.name], kwargs, reserved=("seed",))
        generator = TASKS[task.name](seed=task_seed(config), **kwargs)
        train = generator.split("train", task.train_size)
        test = generator.split("test", task.test_size)
    elif task.name in ("gsm8k", "math"):
        for field in ("train_file", "test_file"):
            if not task.get(field):
                raise ValueError(f"config.task.{field} is required for task {task.name!r}")
        fields = _plain(task.kwargs)
        _check_task_kwargs(task.name, load_jsonl_task, fields, reserved=("path", "kind"))
        train = load_jsonl_task(task.train_file, kind=task.name, **fields)
        test = load_jsonl_task(task.test_file, kind=task.name, **fields)
        if task.train_size:
            train = train[: task.train_size]
        if task.test_size:
            test = test[: task.test_size]
    else:
        raise ValueError(
            f"config.task.name={task.name!r} is not a known task; known: {sorted(TASKS) + ['gsm8k', 'math']}"
        )
    correctness = "countdown" if task.name == "countdown" else "math"
    return TaskData(task.name, train, test, correctness)


def build_tokenizer(config, task: TaskData, workdir: str):
    """Load `config.tokenizer.path`, or reuse the workdir's trained tokenizer, or train one in-process.

    The trained SentencePiece model is deterministic in its texts (the task's train split, templated),
    holds the task's `special_symbols` as single tokens (`data.tasks.task_special_symbols`: the R1 tags,
    and the tool tags for tool demonstrations), and is saved into the workdir so a resume (and
    `scripts/evaluate.py`) reads the same vocabulary.
    """
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    if config.model.pretrained:
        return load_tokenizer(config.model.pretrained)
    saved = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.exists(saved):
        return load_tokenizer(saved)
    texts = [format_prompt(config.template, e["prompt"]) + " " + e.get("completion", "") for e in task.train]
    from grpo_jax.data.tasks import task_special_symbols

    symbols = task_special_symbols(config.task.name, _plain(config.task.get("kwargs", {})))
    return train_sentencepiece(texts, vocab_size=config.tokenizer.vocab_size, user_defined_symbols=symbols)


def tokenizer_fingerprint(tokenizer) -> str:
    pieces = "\n".join(tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size))
    return hashlib.sha256(pieces.encode()).hexdigest()[:16]


def build_model_config(config, tokenizer) -> models.ModelConfig:
    """From scratch: the fields of `config.model` (vocab from the tokenizer); or an HF directory's config."""
    if config.model.pretrained:
        import json

        from grpo_jax.models.hf import config_from_hf

        path = os.path.join(config.model.pretrained, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.model.pretrained: no config.json in {config.model.pretrained}")
        with open(path) as f:
            return config_from_hf(json.load(f), where=path, **runtime_fields(config.model))
    fields = {k: v for k, v in _plain(config.model).items() if k not in ("pretrained",)}
    fields["vocab_size"] = fields.get("vocab_size") or tokenizer.vocab_size
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    return models.ModelConfig(**fields)


def runtime_fields(model_section) -> dict[str, Any]:
    """The `ModelConfig.RUNTIME_FIELDS` (dtypes, remat, attention backend, ...) a config's `model` section
    sets: they apply to a pretrained checkpoint's or a preset's shapes too."""
    section = _plain(model_section)
    return {name: section[name] for name in RUNTIME_FIELDS if name in section}


def initial_params(config, model_config, mesh):
    """Pretrained weights (placed straight into their shardings) or a sharded random init."""
    if config.model.pretrained:
        _, params = models.load_pretrained(
            config.model.pretrained,
            mesh=mesh,
            **{name: getattr(model_config, name) for name in RUNTIME_FIELDS},
        )
        return params
    return models.init_sharded_params(model_config, jax.random.key(config.seed), mesh)


def build_mesh(config, devices=None):
    """The run's (trainer's) mesh: `config.mesh` (the whole (data, fsdp, tensor) shape) over `devices`
    (default: all), split over slices by `config.dcn_mesh` (how many slices each axis spans; absent or
    all ones: one slice), see `sharding.make_mesh`. With a `config.sampler_mesh` the trainer gets the
    devices the sampler does not take (`build_meshes`)."""
    return build_meshes(config, devices)[0]


def sampler_mesh_setting(config) -> tuple[int, int] | None:
    """`config.sampler_mesh`: None (absent or None: the sampler runs on the trainer's mesh) or its
    (replica, tensor) shape, checked in one line (docs/CONTRACTS.md)."""
    shape = config.get("sampler_mesh")
    if shape is None:
        return None
    return sharding.sampler_mesh_shape(tuple(shape) if isinstance(shape, list | tuple) else shape)


def build_meshes(config, devices=None):
    """(trainer mesh, sampler mesh or None). Without `config.sampler_mesh`: `config.mesh` over all
    `devices`, and None (co-located: the sampler decodes on the trainer's mesh). With it: the sampler's
    ("replica", "tensor") mesh over the last replica × tensor devices, on several processes the last of
    each process's devices (`sharding.split_devices`, `sharding.make_sampler_mesh`), and `config.mesh`
    over the rest (docs/ARCHITECTURE.md, "Asynchronous GRPO"). One-line errors when the device counts do
    not add up, with a `config.dcn_mesh` over several slices (not built yet), or when the processes hold
    different rows on the two meshes (`check_same_rows`)."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = config.get("dcn_mesh")
    dcn = None if dcn is None else tuple(dcn)
    shape = sampler_mesh_setting(config)
    if shape is None:
        return sharding.make_mesh(tuple(config.mesh), devices, dcn_shape=dcn), None
    if dcn is not None and any(int(d) != 1 for d in dcn):
        raise ValueError(
            f"config.sampler_mesh={shape} with config.dcn_mesh={dcn}: a multislice split is not built yet; "
            "drop one of them"
        )
    trainer_devices, sampler_devices = sharding.split_devices(devices, shape)
    try:
        trainer = sharding.make_mesh(tuple(config.mesh), trainer_devices, dcn_shape=dcn)
    except ValueError as error:
        raise ValueError(
            f"config.mesh={tuple(config.mesh)} over the {len(trainer_devices)} devices that "
            f"config.sampler_mesh={shape} leaves of {len(devices)}: {error}"
        ) from None
    sampler = sharding.make_sampler_mesh(shape, in_trainer_row_order(trainer, sampler_devices))
    check_same_rows(trainer, sampler)
    return trainer, sampler


def in_trainer_row_order(trainer, sampler_devices) -> list:
    """The sampler's devices with the processes in the order of the first batch row each holds on the
    trainer's mesh (one process: unchanged), so the sampler's replicas take the processes' rows in the
    trainer's order (`jax.make_mesh` lays a TPU slice's hosts out physically, not by process index)."""
    processes = sorted({d.process_index for d in sampler_devices})
    if len(processes) == 1:
        return list(sampler_devices)
    n = sharding.data_parallel_size(trainer)
    first = {
        p: int(
            sharding.process_rows(trainer, n, [d for d in trainer.devices.flat if d.process_index == p])[0]
        )
        for p in processes
    }
    return sorted(sampler_devices, key=lambda d: first[d.process_index])  # stable: in order within a process


def check_same_rows(trainer, sampler) -> None:
    """On several processes each must hold the same rows of a batch on both meshes (a rollout comes back
    to the trainer row by row, in each process, `RolloutStage.to_trainer`), and its trainer devices must
    be a multiple of its sampler devices (the weight sync's mirror, `rollout.weight_sync.mirror_mesh`).
    Raises one line otherwise; nothing to check on one process."""
    processes = sorted(
        {d.process_index for d in trainer.devices.flat} | {d.process_index for d in sampler.devices.flat}
    )
    if len(processes) == 1:
        return
    from grpo_jax.rollout.weight_sync import mirror_mesh

    try:
        mirror_mesh(list(trainer.devices.flat), sampler)
    except ValueError as error:
        raise ValueError(f"config.sampler_mesh: {error}") from None
    n = math.lcm(sharding.data_parallel_size(trainer), sharding.data_parallel_size(sampler))
    for p in processes:
        rows = [
            sharding.process_rows(m, n, [d for d in m.devices.flat if d.process_index == p]).tolist()
            for m in (trainer, sampler)
        ]
        if rows[0] != rows[1]:
            raise ValueError(
                f"config.sampler_mesh with config.mesh={dict(trainer.shape)}: process {p} holds batch rows "
                f"{rows[0]} of {n} on the trainer's mesh but {rows[1]} on the sampler's; lay the trainer's "
                "batch axes out over the processes in order"
            )


def check_reference_dtype(config, name: str) -> None:
    """`config.<name>.reference_dtype`: "" (the params' dtype) or a dtype name such as "bfloat16"."""
    value = config[name].get("reference_dtype", "")
    if value:
        canonical_dtype(value, f"config.{name}.reference_dtype")


def stage_lora(config, name: str) -> LoRAConfig | None:
    """The run's `config.lora` when `config.<name>.lora` is True (the stage trains LoRA adapters over a
    frozen base), None when it trains every weight. Raises one line for a missing or bad section."""
    if not config[name].get("lora", False):
        return None
    if "lora" not in config:
        raise ValueError(
            f"config.{name}.lora=True needs a config.lora section (rank, alpha, targets, base_dtype, "
            "sampler_weights; see grpo_jax/config_utils.py:add_lora)"
        )
    return LoRAConfig.from_dict(_plain(config.lora))


def check_stage_lora(config, name: str, trains_weights: bool) -> None:
    """`config.<name>.lora`: only for a stage that trains weights, with a valid `config.lora`, and not
    with a `reference_dtype` (a LoRA stage's reference is its base: `config.lora.base_dtype` sets it)."""
    lora = stage_lora(config, name)
    if lora is None:
        return
    if not trains_weights:
        raise ValueError(
            f"config.{name}.lora=True: a {name!r} stage trains no weights, so it has no adapters"
        )
    if config[name].get("reference_dtype", ""):
        raise ValueError(
            f"config.{name}.reference_dtype={config[name].reference_dtype!r} with lora=True: the reference "
            "is the frozen base itself; set config.lora.base_dtype instead"
        )


def grpo_config(stage_config) -> GRPOConfig:
    """The typed GRPOConfig of a GRPO stage's `algo` section (unknown keys and bad values raise)."""
    return GRPOConfig.from_dict(_plain(stage_config.algo))


def optimizer_config(stage_config, total_updates: int) -> OptimizerConfig:
    return OptimizerConfig(
        learning_rate=stage_config.learning_rate,
        warmup_steps=stage_config.warmup_steps,
        total_steps=max(total_updates, 1),
        schedule=stage_config.schedule,
        weight_decay=stage_config.weight_decay,
        max_grad_norm=stage_config.max_grad_norm,
    )


def fingerprint(model_config: models.ModelConfig, tokenizer) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: model shapes and the tokenizer's vocabulary."""
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "qkv_bias",
        "o_bias",
        "tie_embeddings",
        "param_dtype",
    )
    return {
        "model": {k: getattr(model_config, k) for k in keys},
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "hash": tokenizer_fingerprint(tokenizer)},
    }


def stop_ids(tokenizer) -> tuple[int, ...]:
    return (tokenizer.eos_id,)


# ------------------------------------------------------------------------------------------------
# Per-stage data
# ------------------------------------------------------------------------------------------------

STAGE_DATA_PREFIX = "stage:"


def check_data_spec(config, name: str) -> None:
    """`config.<name>.data`: "" (the run's task), "stage:NAME" (a file an earlier stage writes) or a path."""
    spec = config[name].get("data", "")
    if spec.startswith(STAGE_DATA_PREFIX):
        source = spec[len(STAGE_DATA_PREFIX) :]
        stages = list(config.stages)
        if source not in stages[: stages.index(name)]:
            raise ValueError(
                f"config.{name}.data={spec!r}: {source!r} is not an earlier stage of {list(config.stages)}"
            )
    elif spec and not os.path.exists(spec):
        raise FileNotFoundError(f"config.{name}.data: no such file {spec}")


def stage_data_file(run, name: str, filename: str) -> str | None:
    """The file stage `name` reads: its `data` path, `DIR/stages/<source>/<filename>` for
    "stage:<source>", or None for the run's task."""
    from grpo_jax.training.stages.base import stage_dir

    spec = run.config[name].get("data", "")
    if spec.startswith(STAGE_DATA_PREFIX):
        path = os.path.join(stage_dir(run.workdir, spec[len(STAGE_DATA_PREFIX) :]), filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.{name}.data={spec!r}: {path} does not exist")
        return path
    return spec or None


def stage_sft_examples(run, name: str) -> list[dict]:
    """SFT examples of stage `name`: the run's train split, or `{"prompt", "completion"}` JSONL lines."""
    path = stage_data_file(run, name, "sft.jsonl")
    if path is None:
        return run.task.train
    return load_jsonl_task(path, kind="sft")


def stage_task(run, name: str) -> TaskData:
    """The task stage `name` trains on: `config.<name>.task` (a section like `config.task`) or the run's."""
    section = run.config[name].get("task")
    if section is None:
        return run.task
    import ml_collections

    stage_config = ml_collections.ConfigDict({"task": section.to_dict(), "seed": run.config.seed})
    return build_task(stage_config)


def sampler_fn(config):
    """The rollout implementation `config.sampler` names (docs/CONTRACTS.md), a function with
    `sampling.generate`'s signature and result: "static" (also when the key is absent, as in the configs
    of older workdirs) is `sampling.generate`; "engine" the rollout engine (`grpo_jax.rollout`) with
    `config.engine.num_slots` decode slots (0: one per row) and `config.engine.page_size` tokens per page.
    A bad name or setting raises one line naming the key."""
    name = config.get("sampler", "static")
    if name not in SAMPLERS:
        raise ValueError(f"config.sampler must be one of {SAMPLERS}, got {name!r}")
    rollout_token_budget(config)  # checked wherever the sampler is: before anything is written
    if name == "static":
        return sampling.generate
    return functools.partial(rollout_engine.generate, **engine_settings(config))


def engine_settings(config) -> dict:
    """`config.engine`'s slots and page size, checked (one line naming the key): {"num_slots": S or None
    (one per row), "page_size"}, for every path that runs the engine (one-shot, partial, multi-turn)."""
    section = config.get("engine") or {}
    num_slots, page_size = section.get("num_slots", 0), section.get("page_size", 16)
    if not isinstance(num_slots, int) or num_slots < 0:
        raise ValueError(f"config.engine.num_slots must be an int >= 0 (0: one per row), got {num_slots!r}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"config.engine.page_size must be an int >= 1, got {page_size!r}")
    return {"num_slots": num_slots or None, "page_size": page_size}


def stage_env(config, name: str):
    """The tool-use settings of stage `name` (`grpo_jax.envs.EnvConfig`, checked: one line naming the key)
    or None when its section sets no `env`."""
    from grpo_jax.envs import EnvConfig

    return EnvConfig.from_config(config[name], name=f"config.{name}")


def check_tool_demonstrations(config, stages, task, tokenizer, num_examples: int = 8) -> None:
    """Each tool-use stage's call format (`config.<stage>.tool_format`) against the task's tool-use
    demonstrations (examples with `completion_segments`): a call segment (the trainable text before an
    untrainable one) must parse as a call of one of the stage environment's tools and the untrainable
    segment must be a response in that format. A cold start that taught another format or another tool
    would otherwise leave every rollout without an answered call. One line naming the stage's key; a
    task without such demonstrations is not checked. The trainer calls it only for runs with an SFT stage
    (a run that never trains on the demonstrations may use another format)."""
    from grpo_jax.envs.tool_format import ToolCall, parse_tool_call

    demos = [e for e in task.train[: 16 * num_examples] if e.get("completion_segments")][:num_examples]
    if not demos:
        return
    for name in stages:
        env = stage_env(config, name)
        if env is None:
            continue
        fmt, tools = env.tool_format_for(tokenizer), env.tool_names(tokenizer)
        for example in demos:
            segments = list(example["completion_segments"])
            for (call, _), (response, trainable) in zip(segments, segments[1:], strict=False):
                if trainable:
                    continue
                parsed = parse_tool_call(call, fmt)
                if not isinstance(parsed, ToolCall) or fmt.response_open not in response:
                    raise ValueError(
                        f"config.{name}.tool_format={env.tool_format!r}: the task's tool-use demonstrations "
                        f"are in another format (prompt {example.get('prompt', '')!r}: call {call!r}, "
                        f"response {response!r}); set the format the demonstrations use"
                    )
                if parsed.name not in tools:
                    raise ValueError(
                        f"config.{name}.env={env.env!r} offers the tools {tools}; the task's tool-use "
                        f"demonstrations call {parsed.name!r} (prompt {example.get('prompt', '')!r}: call "
                        f"{call!r}); set the env whose tools they call"
                    )


def eval_env_stage(config) -> str | None:
    """The first stage of the run with an `env`: held-out evaluation lets the model use its tools (every
    stage's eval, the cold start's included), so a tool-use run is measured as it is meant to work."""
    for name in config.stages:
        if config[name].get("env", ""):
            return name
    return None


def turn_sampler(config, env_config, tokenizer):
    """Multi-turn rollouts with `env_config`'s tools (`grpo_jax.rollout.turns.TurnSampler`), on the
    engine's pages and slots settings (`config.engine`)."""
    from grpo_jax.rollout.turns import TurnSampler

    return TurnSampler(
        env_config,
        tokenizer,
        max_observation_tokens=env_config.max_observation_tokens,
        **engine_settings(config),
    )


def eval_generate_fn(config, tokenizer):
    """The held-out evaluator's sampler: multi-turn with the tools of `eval_env_stage` where a stage has
    them, else `sampler_fn(config)`."""
    name = eval_env_stage(config)
    if name is None:
        return sampler_fn(config)
    return turn_sampler(config, stage_env(config, name), tokenizer)


def rollout_token_budget(config) -> int:
    """`config.engine.rollout_token_budget`: decode iterations per training step with partial rollouts
    (`grpo_jax.rollout.partial`), 0 (or absent) = off: every step samples whole rollouts. Only with
    `config.sampler="engine"`; `config.engine.max_inflight_groups` is checked here too. One line each."""
    section = config.get("engine") or {}
    budget, groups = section.get("rollout_token_budget", 0), section.get("max_inflight_groups", 0)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"config.engine.rollout_token_budget must be an int >= 0 (0: off), got {budget!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 0:
        raise ValueError(
            f"config.engine.max_inflight_groups must be an int >= 0 (0: 4 x prompts_per_step), got {groups!r}"
        )
    if budget and config.get("sampler", "static") != "engine":
        raise ValueError(
            f"config.engine.rollout_token_budget={budget} (partial rollouts) needs config.sampler='engine', "
            f"got {config.get('sampler', 'static')!r}"
        )
    return budget


def max_inflight_groups(config, prompts_per_step: int) -> int:
    """Q, the groups the partial-rollout engine holds at once: `config.engine.max_inflight_groups`, or
    4 x prompts_per_step when 0. A multiple of B: prompts are enqueued in whole batches while there is
    room, and each step hands out B, so Q − B groups are in flight after a hand-out; at Q = 2B a step that
    hands out fewer than B groups admits no prompts and its slots idle once the queue drains, so the
    default keeps a deeper queue (benchmarks/partial_rollouts.md)."""
    groups = (config.get("engine") or {}).get("max_inflight_groups", 0) or 4 * prompts_per_step
    if groups % prompts_per_step:
        raise ValueError(
            f"config.engine.max_inflight_groups={groups} must be a multiple of prompts_per_step="
            f"{prompts_per_step} (0: 4 x it)"
        )
    return groups


def off_policy_steps(config, name: str) -> int:
    """`config.<name>.off_policy_steps` = k: how many updates a stage's rollout may be older than the
    params it trains (0, the default: on-policy; docs/ARCHITECTURE.md, "Asynchronous GRPO"). One line
    for anything but an int >= 0."""
    steps = config[name].get("off_policy_steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"config.{name}.off_policy_steps must be an int >= 0 (0: on-policy), got {steps!r}")
    return steps
