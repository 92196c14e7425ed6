"""Load a trained policy back for sampling, evaluation or export: from a training workdir or an HF directory.

A training workdir (what `scripts/train.py` writes) holds `config.json` (the run's ml_collections config),
`tokenizer.model` (when the tokenizer was trained in-process) and orbax checkpoints under `checkpoints/`.
`load_policy` rebuilds the tokenizer and model config from the saved config exactly as the trainer does
(`grpo_jax.training.setup`) and restores only the policy params of the checkpoint, straight into their
shardings (`Checkpointer.restore_params`: optimizer state, reference and critic are never read).
A Hugging Face directory (`config.json` + `*.safetensors`) goes through `load_pretrained` and
`load_tokenizer`.

Reading never writes: the checkpoint folder is opened read-only, so evaluating next to a live run leaves
its in-progress save alone.

A sampled number means little without its temperature, top-p and top-k. `SamplingSettings` carries
them (and says where they came from); `run_sampling_settings` reads a run's rollout settings from its
config, which is what scripts/sample.py and scripts/evaluate.py default to for a training workdir.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from grpo_jax import models, sharding
from grpo_jax.checkpointing import Checkpointer, DamagedCheckpointError, checkpoint_directory
from grpo_jax.models import lora as lora_lib
from grpo_jax.tokenizers import load_tokenizer
from grpo_jax.training import setup
from grpo_jax.training.stages import STAGE_KINDS, stage_kind

CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------------------
# What a source is
# ------------------------------------------------------------------------------------------------


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory: `config.json` next to `*.safetensors` (or a sharded index)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and bool(
        glob.glob(os.path.join(path, "*.safetensors"))
    )


def is_workdir(path: str | os.PathLike) -> bool:
    """A training workdir: the run's `config.json` and a `checkpoints/` folder, and no safetensors."""
    path = os.fspath(path)
    return (
        os.path.isfile(os.path.join(path, CONFIG_FILE))
        and os.path.isdir(checkpoint_directory(path))
        and not is_hf_directory(path)
    )


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run's config as saved by the trainer (tuples come back as lists; `setup` accepts both)."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (not a training workdir written by scripts/train.py)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _check_source(source: str) -> None:
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"{source}: no such directory (expected a training workdir or an HF model directory)"
        )
    if is_hf_directory(source) or is_workdir(source):
        return
    if os.path.isfile(os.path.join(source, CONFIG_FILE)):
        raise FileNotFoundError(
            f"{source}: has config.json but neither a checkpoints/ folder (training workdir) nor "
            "*.safetensors (Hugging Face directory); a run that saved no checkpoint yet cannot be loaded"
        )
    raise FileNotFoundError(
        f"{source}: no config.json (expected a training workdir or an HF model directory)"
    )


def select_step(workdir: str | os.PathLike, *, step: int | None = None, best: bool = False) -> int:
    """The checkpoint step to load: `step` if given, else the best by eval accuracy (`best=True`, falling
    back to the latest when no checkpoint was saved with an eval), else the latest."""
    directory = checkpoint_directory(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (the run saved no checkpoint)")
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        return _select(checkpointer, step, best)
    finally:
        checkpointer.close()


def _select(checkpointer: Checkpointer, step: int | None, best: bool) -> int:
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"{checkpointer.directory}: no complete checkpoint")
    if step is not None:
        if int(step) not in steps:
            raise FileNotFoundError(
                f"{checkpointer.directory}: no checkpoint for step {step}; available: {steps}"
            )
        return int(step)
    if best:
        best_step = checkpointer.best_step()
        if best_step is not None:
            return best_step
        logging.warning("%s: no checkpoint carries eval/accuracy; using the latest", checkpointer.directory)
    return steps[-1]


# ------------------------------------------------------------------------------------------------
# Restore
# ------------------------------------------------------------------------------------------------


def _workdir_tokenizer(config, workdir: str):
    saved = os.path.join(workdir, setup.TOKENIZER_FILE)
    if not (config.tokenizer.path or config.model.pretrained or os.path.exists(saved)):
        raise FileNotFoundError(f"{saved}: no such file, and the run's config names no tokenizer path")
    return setup.build_tokenizer(config, None, workdir)  # loads; the task is only needed to train one


def _workdir_mesh(config):
    try:
        return setup.build_mesh(config)
    except ValueError as error:
        logging.warning(
            "the run's mesh %s does not fit here (%s); using (-1, 1, 1)", tuple(config.mesh), error
        )
        return sharding.make_mesh((-1, 1, 1))


def _restore_policy(checkpointer, step, config, source, model_config, tokenizer, mesh):
    """(stage name, policy params) of checkpoint `step` of a workdir, placed on `mesh`. A LoRA stage's
    checkpoint holds only adapters: they are merged onto its base, rebuilt as the trainer built it."""
    extra = checkpointer.read_extra(step)
    stage = extra["stage"]
    if stage not in config:
        raise ValueError(
            f"{checkpointer.directory}: checkpoint {step} belongs to stage {stage!r}, "
            f"which {os.path.join(source, CONFIG_FILE)} does not define"
        )
    shardings = models.model_param_shardings(mesh, model_config)
    fingerprint = setup.fingerprint(model_config, tokenizer)
    if extra.get("lora") is None:
        template = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
        params, _ = checkpointer.restore_params(template, shardings, step, fingerprint=fingerprint)
        return stage, params
    lora = lora_lib.LoRAConfig.from_dict(extra["lora"]["config"])
    base = lora_base(source, config, model_config, mesh, extra["lora"], where=f"checkpoint {step}")
    template = jax.eval_shape(lambda: lora_lib.init_adapters(model_config, lora, jax.random.key(0)))
    adapters, _ = checkpointer.restore_params(
        template, lora_lib.adapter_shardings(mesh, model_config, lora), step, fingerprint=fingerprint
    )
    merger = lora_lib.Merger(model_config.weight_dtype, cast_rest=True)
    return stage, merger(lora_lib.FrozenBase(base, lora.scale), adapters)


def lora_base(workdir: str, config, model_config, mesh, info: dict, *, where: str):
    """The frozen base a LoRA checkpoint's adapters were trained on, rebuilt as the trainer built it
    (`info` = the checkpoint's `extra["lora"]`): the saved result of stage `base_from`, or the run's
    initial model (pretrained weights or the seeded init), in `base_dtype`; a base whose fingerprint
    differs from the recorded one is refused in one line."""
    source = info.get("base_from")
    if source is None:
        params = setup.initial_params(config, model_config, mesh)
    else:
        path = os.path.join(workdir, "stages", source, "result")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: the base of the LoRA adapters ({where}) is missing")
        template = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
        target = jax.tree_util.tree_map(
            lambda t, sh: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sh),
            template,
            models.model_param_shardings(mesh, model_config),
        )
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path, target)
    dtype = info["config"].get("base_dtype") or ""
    if dtype:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    found = lora_lib.fingerprint(params)
    if found != info["base_fingerprint"]:
        raise ValueError(
            f"{workdir}: the LoRA adapters of {where} were trained on a base with fingerprint "
            f"{info['base_fingerprint']}, but {source or 'the initial model'} now gives {found}"
        )
    return params


def load_policy(
    source: str | os.PathLike, *, step: int | None = None, best: bool = False, mesh=None
) -> tuple[models.ModelConfig, Any, Any, ml_collections.ConfigDict | None]:
    """Load the policy of a training workdir or a Hugging Face directory.

    Returns (model_config, params, tokenizer, config): `config` is the run's ConfigDict for a workdir and
    None for an HF directory. For a workdir, `step` picks a checkpoint (default: the latest; `best=True`:
    the best by eval accuracy, see `select_step`). `mesh`: where params are placed (default: the run's
    mesh if it fits the devices here, else all devices on "data"; for HF, all devices on "data").
    Raises FileNotFoundError naming the missing path, ValueError when the checkpoint does not match the
    run's model or tokenizer.
    """
    source = os.fspath(source)
    _check_source(source)
    if is_hf_directory(source):
        if step is not None or best:
            raise ValueError(
                f"{source}: step/best select a checkpoint of a training workdir, not of an HF directory"
            )
        mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        model_config, params = models.load_pretrained(source, mesh=mesh)
        return model_config, params, load_tokenizer(source), None

    config = read_config(source)
    tokenizer = _workdir_tokenizer(config, source)
    model_config = setup.build_model_config(config, tokenizer)
    mesh = mesh if mesh is not None else _workdir_mesh(config)
    checkpointer = Checkpointer(checkpoint_directory(source), read_only=True)
    try:
        chosen = _select(checkpointer, step, best)
        # Unless a step was asked for, a damaged checkpoint gives way to the next older one (read-only:
        # it is named in a warning and left where it is; a resumed run sets it aside).
        older = [s for s in reversed(checkpointer.all_steps()) if s != chosen]
        candidates = [chosen] if step is not None else [chosen, *older]
        for candidate in candidates:
            try:
                stage, params = _restore_policy(
                    checkpointer, candidate, config, source, model_config, tokenizer, mesh
                )
                step = candidate
                break
            except DamagedCheckpointError as error:
                if candidate == candidates[-1]:
                    raise
                logging.warning("%s; trying the next older checkpoint (left in place)", error)
    finally:
        checkpointer.close()
    logging.info("loaded step %d (stage %s) from %s", step, stage, checkpointer.directory)
    return model_config, params, tokenizer, config


# ------------------------------------------------------------------------------------------------
# The sampling settings behind a number
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Temperature (0 = greedy), top-p (1 = off) and top-k (0 = off) of a sampler call; `source` says
    where they came from (e.g. "config.grpo of the run", "defaults", "--temperature")."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    source: str = "defaults"

    def describe(self, k: int | None = None) -> str:
        """ "T=0.35, top_p=1.0, top_k=0" (", k=8" with k), the label printed next to a sampled number."""
        text = f"T={self.temperature}, top_p={self.top_p}, top_k={self.top_k}"
        return text if k is None else f"{text}, k={k}"

    def override(self, *, temperature=None, top_p=None, top_k=None) -> SamplingSettings:
        """These settings with every value that is not None replaced: explicit flags win."""
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        given = {name: value for name, value in given.items() if value is not None}
        if not given:
            return self
        flags = ", ".join(f"--{name}" for name in given)
        return dataclasses.replace(
            self,
            temperature=float(given.get("temperature", self.temperature)),
            top_p=float(given.get("top_p", self.top_p)),
            top_k=int(given.get("top_k", self.top_k)),
            source=f"{flags}; the rest from {self.source}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_sampling_settings(config, stage: str | None = None) -> SamplingSettings | None:
    """The rollout sampling settings of a run's config (a ConfigDict as `workdir.read_config` gives it).

    They are the settings of a stage that trains on its own rollouts (a `Stage` with
    `trains_on_rollouts`: grpo, ppo; `config.<stage>.algo.temperature`,
    `config.<stage>.top_p`, `config.<stage>.top_k`): `stage` itself if it is one, else the nearest one
    before it in `config.stages` (the policy was last trained on those rollouts), else the first one
    after it; with no `stage`, the run's last rollout stage. None when the run has no rollout stage.
    """
    names = list(config.get("stages", ()))
    rollout = [i for i, name in enumerate(names) if STAGE_KINDS[stage_kind(name)].trains_on_rollouts]
    if not rollout:
        return None
    if stage in names:
        before = [i for i in rollout if i <= names.index(stage)]
        index = before[-1] if before else rollout[0]
    else:
        index = rollout[-1]
    name = names[index]
    section = config[name]
    algo = section.get("algo") or {}
    return SamplingSettings(
        temperature=float(algo.get("temperature", 1.0)),
        top_p=float(section.get("top_p", 1.0)),
        top_k=int(section.get("top_k", 0)),
        source=f"config.{name} of the run"
        if stage is None or name == stage
        else f"config.{name} of the run (the checkpoint is from stage {stage!r})",
    )


def checkpoint_stage(workdir: str | os.PathLike, step: int) -> str:
    """The stage that wrote checkpoint `step` of a training workdir (read-only; no arrays are read)."""
    with Checkpointer(checkpoint_directory(workdir), read_only=True) as checkpointer:
        return checkpointer.read_extra(step)["stage"]
