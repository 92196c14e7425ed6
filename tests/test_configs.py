"""Every shipped config parses and its typed pieces validate, so a typo fails here, not hours into a run.

Config files are discovered with a glob: a new `configs/*.py` is covered without editing this file. Each
file's `get_config()` is checked, and its `runlocal` variant when the file mentions one (STYLE.md: the
closing `runlocal` block shrinks any config to laptop size).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import types
from pathlib import Path

import ml_collections
import pytest

from grpo_jax import models
from grpo_jax.data.tasks import TASKS
from grpo_jax.data.templates import TEMPLATES
from grpo_jax.rewards import HOST_REWARDS, TokenSpec, make_reward_fns
from grpo_jax.testing import tiny_model_config, tiny_tokenizer
from grpo_jax.training import setup
from grpo_jax.training.stages import STAGE_KINDS
from grpo_jax.training.trainer import stage_kind, validate_stages

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))

# What scripts/train.py reads from a config (grpo_jax/training/trainer.py and setup.py).
TOP_LEVEL_KEYS = {
    "seed",
    "mesh",
    "dcn_mesh",
    "template",
    "max_prompt_len",
    "max_new_tokens",
    "max_answer_len",
    "logprob_chunk_size",
    "max_nonfinite_in_a_row",
    "progress_bar",
    "tensorboard",
    "compilation_cache_dir",
    "sampler",
    "engine",
    "task",
    "tokenizer",
    "model",
    "stages",
    "eval",
    "checkpoint",
    "debug",
}
SECTION_KEYS = {
    "task": {"name", "kwargs", "train_size", "test_size", "train_file", "test_file"},
    "tokenizer": {"path", "vocab_size"},
    "model": {"pretrained"},
    "eval": {"num_problems", "batch_size", "k", "temperature"},
    "checkpoint": {"keep_last", "keep_best", "async_save"},
    "debug": {"poison_step"},
}
OPTIMIZER_KEYS = {
    "steps",
    "learning_rate",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "max_grad_norm",
    "eval_every",
    "eval_at_end",
    "checkpoint_every",
}
ROLLOUT_KEYS = {"prompts_per_step", "top_p", "top_k", "rewards", "host_rewards", "host_reward_timeout_s"}
PAIR_KEYS = OPTIMIZER_KEYS | {"batch_size", "max_len"}
STAGE_KEYS = {
    "sft": OPTIMIZER_KEYS | {"batch_size", "num_examples", "max_len"},
    "grpo": OPTIMIZER_KEYS | ROLLOUT_KEYS | {"eval_at_start", "algo"},
    "ppo": OPTIMIZER_KEYS | ROLLOUT_KEYS | {"algo"},
    "rm": PAIR_KEYS,
    "dpo": PAIR_KEYS | {"beta"},
    "rejection_sampling": ROLLOUT_KEYS
    | {"steps", "num_samples", "temperature", "keep", "non_reasoning_data", "non_reasoning_ratio"},
}


def _load(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants(path: Path) -> list[str | None]:
    return [None, "runlocal"] if "runlocal" in path.read_text() else [None]


CASES = [
    pytest.param(path, variant, id=f"{path.stem}" + (f":{variant}" if variant else ""))
    for path in CONFIG_FILES
    for variant in _variants(path)
]


def test_the_embedded_default_is_discovered():
    assert CONFIG_DIR / "quickstart.py" in CONFIG_FILES
    assert (CONFIG_DIR / "quickstart.py", "runlocal") in [tuple(case.values) for case in CASES]


@pytest.fixture(scope="module")
def token_spec():
    return TokenSpec.from_tokenizer(tiny_tokenizer())


@pytest.mark.parametrize("path, variant", CASES)
def test_config_parses_and_its_typed_pieces_validate(path, variant, token_spec):
    get_config = _load(path).get_config
    config = get_config(variant) if variant else get_config()
    assert isinstance(config, ml_collections.ConfigDict)
    config.lock()  # scripts/train.py locks it, then writes it as config.json
    assert config.to_json_best_effort()

    missing = TOP_LEVEL_KEYS - set(config.keys())
    assert not missing, f"{path.name}: missing top-level keys {sorted(missing)}"
    for section, keys in SECTION_KEYS.items():
        lacking = keys - set(config[section].keys())
        assert not lacking, f"{path.name}: config.{section} lacks {sorted(lacking)}"
    assert len(tuple(config.mesh)) == 3 and all(isinstance(n, int) for n in config.mesh)
    assert len(tuple(config.dcn_mesh)) == 3 and all(isinstance(n, int) and n >= 1 for n in config.dcn_mesh)
    assert config.template in TEMPLATES
    setup.sampler_fn(config)  # config.sampler and config.engine are valid

    # Task: a known name; a synthetic task builds its splits, a JSONL task names its files.
    task = config.task
    assert task.name in (*TASKS, "gsm8k", "math"), task.name
    if task.name in TASKS:
        data = setup.build_task(config)
        assert len(data.train) == task.train_size and len(data.test) == task.test_size
        assert config.eval.num_problems <= len(data.test)
    else:
        # File tasks take their data paths from flags (--config.task.train_file=...); the keys must exist.
        assert isinstance(task.train_file, str) and isinstance(task.test_file, str)

    # Model: the fields of ModelConfig (vocab from the tokenizer when 0), or a pretrained directory (which
    # a config like gsm8k_qwen2_5 takes from a flag, so it has no architecture fields of its own).
    if not config.model.pretrained and config.model.get("hidden_size"):
        vocab = config.model.get("vocab_size") or config.tokenizer.vocab_size
        fake_tokenizer = types.SimpleNamespace(vocab_size=vocab)
        model_config = setup.build_model_config(config, fake_tokenizer)
        assert model_config.hidden_size == config.model.hidden_size
    else:
        fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
        assert set(config.model.keys()) - {"pretrained"} <= fields

    # Stages: valid names, each with its section, checked the way the trainer checks them before a run
    # (init_from, data sources, reward_model_from, typed algorithm configs); optimizer configs validate.
    stages = validate_stages(config)
    for name in stages:
        kind = stage_kind(name)
        STAGE_KINDS[kind].validate(config, name)
        section = config[name]
        missing = STAGE_KEYS[kind] - set(section.keys())
        assert not missing, f"{path.name}: config.{name} lacks {sorted(missing)}"
        assert section.steps > 0 and section.checkpoint_every > 0
        if "learning_rate" in section:
            setup.optimizer_config(section, section.steps)
        if kind in ("grpo", "ppo", "rejection_sampling"):
            make_reward_fns(
                [tuple(r) for r in section.rewards],
                token_spec,
                tokenizer=tiny_tokenizer(),
                model_config=tiny_model_config(),
            )
            unknown = [spec[0] for spec in section.host_rewards if spec[0] not in HOST_REWARDS]
            assert not unknown, f"{path.name}: config.{name}.host_rewards names unknown rewards {unknown}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_get_config_takes_an_optional_variant(path):
    """`--config=configs/x.py` calls get_config() with no argument; `x.py:variant` passes a string."""
    parameters = list(inspect.signature(_load(path).get_config).parameters.values())
    assert len(parameters) <= 1
    if parameters:
        assert parameters[0].default is None
        with pytest.raises(ValueError):  # a mistyped variant must not silently give the full config
            _load(path).get_config("no-such-variant")


@pytest.mark.parametrize(
    "name", ["r1_pipeline.py", "compare_rl.py", "ppo_baseline.py", "dpo.py", "quickstart_process.py"]
)
def test_configs_with_committed_results_keep_the_quickstarts_first_recipe(name):
    """The quickstart's recipe moved on; the configs whose committed results were made with its first
    recipe keep it (config_utils.QUICKSTART_FIRST_RECIPE), so their commands reproduce them."""
    from grpo_jax.config_utils import QUICKSTART_FIRST_RECIPE, sibling_config

    quickstart = sibling_config(str(CONFIG_DIR / "x"), "quickstart.py").to_dict()
    derived = sibling_config(str(CONFIG_DIR / "x"), name).to_dict()

    def at(d, key):
        for part in key.split("."):
            d = d.get(part, {}) if isinstance(d, dict) else {}
        return d

    pinned = dict(QUICKSTART_FIRST_RECIPE, **{"sft.steps": 225})
    assert all(at(quickstart, k) != v for k, v in pinned.items())
    present = {k: at(derived, k) for k in pinned if at(derived, k) != {}}
    assert len(present) >= 2 and present == {k: pinned[k] for k in present}
