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


# The quickstart's first recipe: a cold start on 1,000 demonstrations stopped part-way up its learning
# curve, then GRPO at T = 0.35 without dynamic sampling, each seed on its own problems. The configs built on
# the quickstart whose committed results (benchmarks/r1_pipeline.md, grpo_vs_ppo.md, ablations/, peer_trl.md)
# were made with it keep it, so their commands still reproduce those numbers. The algorithm's keys apply
# to every variant; the sizes not to `:runlocal`, which sets its own.
QUICKSTART_FIRST_RECIPE = {
    "task.seed": -1,
    "grpo.learning_rate": 5e-5,
    "grpo.algo.temperature": 0.35,
    "grpo.algo.dynamic_sampling": False,
    "grpo.algo.dynamic_sampling_refill": False,
}
QUICKSTART_FIRST_SIZES = {
    "sft.steps": 225,
    "sft.num_examples": 1000,
    "sft.eval_every": 225,
    "sft.checkpoint_every": 75,
    "grpo.steps": 300,
}


def quickstart_first_recipe(
    config: ml_collections.ConfigDict, arg: str | None = None
) -> ml_collections.ConfigDict:
    """`config` (built on `configs/quickstart.py`) with the quickstart's first recipe
    (`QUICKSTART_FIRST_RECIPE`, and `QUICKSTART_FIRST_SIZES` unless `arg` is "runlocal")."""
    overrides = dict(QUICKSTART_FIRST_RECIPE)
    if arg != "runlocal":
        overrides.update(QUICKSTART_FIRST_SIZES)
    config.update_from_flattened_dict(overrides)
    return config


ABLATION_RL_STEPS = 150  # most of the quickstart's 300-step gain is in; 36-run sweeps fit a CPU afternoon


def ablation_config(this_file: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The quickstart (`configs/quickstart.py`, its first recipe: the sweeps' committed results were made
    with it) as an ablation base: the same task, model and SFT, and
    `ABLATION_RL_STEPS` GRPO steps with a held-out eval every 25 (curves for the sweep's plot).
    `:runlocal` is the quickstart's own smoke variant."""
    config = quickstart_first_recipe(sibling_config(this_file, "../quickstart.py", arg), arg)
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
