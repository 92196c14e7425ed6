"""LoRA end to end (configs/lora.py:every_stage through scripts/train.py): full cold-start SFT, then sft2,
rm, grpo, ppo and dpo each on adapters over the previous result. Every LoRA stage's checkpoints hold only
the adapters (and a reward head) with their optimizer state, no reference and no base, plus where the base
comes from and its fingerprint; a checkpoint loads as its merged policy, equal to the stage's saved result;
a run killed with SIGKILL inside a LoRA stage resumes to the uninterrupted run's metrics line for line; a
resume over a base that changed is refused in one line. The unit tests are tests/test_lora.py.

Global steps: sft 1-2, sft2 3-4, rm 5-6, grpo 7-8, ppo 9-10, dpo 11-12 (a checkpoint after every step).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from shared_runs import compilation_cache
from test_resume import _complete_lines, assert_reproduces, run_and_kill
from test_train_script import assert_ok, checkpoint_steps, last_line, metric_lines, train

from grpo_jax import models
from grpo_jax.checkpointing import Checkpointer, checkpoint_directory
from grpo_jax.models import lora as lora_lib

REPO = Path(__file__).resolve().parents[1]
EVERY_STAGE = f"--config={REPO / 'configs' / 'lora.py'}:every_stage"
OVERRIDES = ("--config.checkpoint.keep_last=12",)
# The final checkpoint of each stage, and the stage whose result its base is (None: trains every weight).
FINAL_STEP = {"sft": 2, "sft2": 4, "rm": 6, "grpo": 8, "ppo": 10, "dpo": 12}
BASE_FROM = {"sft": None, "sft2": "sft", "rm": "sft2", "grpo": "sft2", "ppo": "grpo", "dpo": "ppo"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def every_stage(tmp_path_factory, xla_cache) -> Path:
    """The uninterrupted run (read-only: tests copy it before changing it)."""
    workdir = tmp_path_factory.mktemp("lora") / "every_stage"
    assert_ok(train(workdir, *OVERRIDES, config=EVERY_STAGE, cache=xla_cache, timeout=600))
    return workdir


def test_every_lora_stage_checkpoints_only_its_adapters_and_their_optimizer_state(every_stage):
    with Checkpointer(checkpoint_directory(every_stage), read_only=True) as checkpointer:
        for stage, step in FINAL_STEP.items():
            extra, leaves = checkpointer.read_extra(step), list(checkpointer.read_meta(step)["leaves"])
            assert extra["stage"] == stage
            params = [k for k in leaves if k.startswith("params/")]
            moments = [k for k in leaves if k.startswith("opt_state/") and ("/mu/" in k or "/nu/" in k)]
            assert not [k for k in leaves if k.startswith(("ref_params", "base"))], stage  # no second copy
            if BASE_FROM[stage] is None:
                assert extra.get("lora") is None and "params/embed" in params
                continue
            info = extra["lora"]
            assert info["base_from"] == BASE_FROM[stage] and len(info["base_fingerprint"]) == 16
            assert info["config"]["rank"] == 4
            trained = ("/lora/", "/head/") if stage == "rm" else ("/lora/",)
            assert params and all(any(t in k for t in trained) for k in params), (stage, params)
            assert moments and all(any(t in k for t in trained) for k in moments), (stage, moments)
    # A PEFT adapter directory beside each LoRA policy stage's merged result (the rm's result is the rm).
    for stage, base in BASE_FROM.items():
        has_adapter = base is not None and stage != "rm"
        assert (every_stage / "stages" / stage / "adapter" / "adapter_config.json").exists() == has_adapter
    # Updates moved the policy: the kl against the base is non-zero after the first GRPO update.
    grpo = [x for x in metric_lines(every_stage) if x["stage"] == "grpo"]
    assert grpo[0]["kl"] == 0.0 and grpo[1]["kl"] > 0


def test_a_lora_checkpoint_loads_as_the_merged_policy_the_stage_saved(every_stage):
    """load_policy (sample.py, evaluate.py, convert_hf.py) rebuilds grpo's base (sft2's result), checks its
    fingerprint and merges checkpoint 8's adapters: the same weights as stages/grpo/result."""
    from grpo_jax.workdir import load_policy

    model_config, params, _, _ = load_policy(every_stage, step=8)
    shapes = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
    with ocp.StandardCheckpointer() as checkpointer:
        result = checkpointer.restore(every_stage / "stages" / "grpo" / "result", shapes)
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(result), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    _, adapters = lora_lib.load_peft_adapter(str(every_stage / "stages" / "grpo" / "adapter"), model_config)
    assert np.abs(np.asarray(adapters["layers"]["lora"]["q"]["b"])).max() > 0  # trained, not the init


def test_killed_inside_a_lora_stage_resumes_to_the_same_run(tmp_path, every_stage, xla_cache):
    """SIGKILL after grpo's second step (newest checkpoint: its first, adapters + Adam moments mid-stage);
    the rerun resumes there, redoes the step and runs ppo and dpo, line for line the uninterrupted run."""
    workdir = tmp_path / "run"

    def ready():
        lines = _complete_lines(workdir)
        return 7 in checkpoint_steps(workdir) and any(x["stage"] == "grpo" and x["step"] == 8 for x in lines)

    killed = tmp_path / "killed.log"
    run_and_kill(
        workdir,
        killed,
        xla_cache,
        ready,
        config=EVERY_STAGE,
        overrides=OVERRIDES,
        deadline_s=420,
        HANG_AFTER="grpo:8",
    )
    assert checkpoint_steps(workdir)[-1] == 7
    result = train(workdir, *OVERRIDES, config=EVERY_STAGE, cache=xla_cache, timeout=600)
    assert_ok(result)
    assert "at stage grpo step 1" in result.stderr
    assert_reproduces(workdir, every_stage)


def test_a_resume_over_a_changed_base_is_refused_in_one_line(tmp_path, every_stage, xla_cache):
    """grpo's adapters (checkpoint 7) were trained over sft2's result; with sft's result in its place the
    rebuilt base has another fingerprint, and the rerun stops before any step."""
    workdir = tmp_path / "run"
    shutil.copytree(every_stage, workdir)
    for step in checkpoint_steps(workdir):
        if step > 7:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    shutil.rmtree(workdir / "stages" / "sft2" / "result")
    shutil.copytree(every_stage / "stages" / "sft" / "result", workdir / "stages" / "sft2" / "result")
    result = train(workdir, *OVERRIDES, config=EVERY_STAGE, cache=xla_cache, timeout=600)
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert "fingerprint" in line and "checkpoint 7 of stage 'grpo'" in line and "sft2" in line, line
    assert checkpoint_steps(workdir)[-1] == 7  # nothing saved over the refused checkpoint
