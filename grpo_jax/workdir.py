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
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from grpo_jax import models, sharding
from grpo_jax.checkpointing import Checkpointer, DamagedCheckpointError, checkpoint_directory
from grpo_jax.tokenizers import load_tokenizer
from grpo_jax.training import setup

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
    """(stage name, policy params) of checkpoint `step` of a workdir, placed on `mesh`."""
    stage = checkpointer.read_extra(step)["stage"]
    if stage not in config:
        raise ValueError(
            f"{checkpointer.directory}: checkpoint {step} belongs to stage {stage!r}, "
            f"which {os.path.join(source, CONFIG_FILE)} does not define"
        )
    template = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
    params, _ = checkpointer.restore_params(
        template,
        sharding.model_param_shardings(mesh, model_config),
        step,
        fingerprint=setup.fingerprint(model_config, tokenizer),
    )
    return stage, params


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
