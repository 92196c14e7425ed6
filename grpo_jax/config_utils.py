"""Helpers for `configs/*.py` files, which are loaded by path (ml_collections `config_flags`), not as a
package: a config that extends another (e.g. the R1 pipeline on the quickstart's task and model) loads its
sibling with `sibling_config(__file__, "quickstart.py", arg)`."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def sibling_config(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file `name` in the same folder as `this_file`."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    spec = importlib.util.spec_from_file_location(f"configs_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


ABLATION_RL_STEPS = 150  # most of the quickstart's 300-step gain is in; 36-run sweeps fit a CPU afternoon


def ablation_config(this_file: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The quickstart (`configs/quickstart.py`) as an ablation base: the same task, model and SFT, and
    `ABLATION_RL_STEPS` GRPO steps with a held-out eval every 25 (curves for the sweep's plot).
    `:runlocal` is the quickstart's own smoke variant."""
    config = sibling_config(this_file, "../quickstart.py", arg)
    if arg != "runlocal":
        config.grpo.update(steps=ABLATION_RL_STEPS, eval_every=25)
    return config


def add_lora(config: ml_collections.ConfigDict, on=(), **fields) -> ml_collections.ConfigDict:
    """Give `config` a `lora` section (`grpo_jax.models.lora.LoRAConfig`'s fields, `fields` overriding
    them) and every stage section that trains weights a `lora` switch, True for the stages named in `on`
    and False for the others, so `--config.<stage>.lora=True --config.lora.rank=8` works on the command
    line (a locked config takes no new keys)."""
    from grpo_jax.models.lora import LoRAConfig

    section = LoRAConfig(**fields).to_dict()
    section["targets"] = tuple(section["targets"])
    config.lora = ml_collections.ConfigDict(section)
    unknown = [name for name in on if name not in config.stages]
    if unknown:
        raise ValueError(f"add_lora: {unknown} are not stages of {tuple(config.stages)}")
    for name in config.stages:
        if not name.startswith("rejection_sampling"):
            config[name].lora = name in on
    return config
