"""The stage loop end to end: the six-stage R1 pipeline, the PPO and DPO baselines, resume inside a
non-GRPO stage, and the rejection-sampling set; plus the small pure pieces the stages are made of.

Two uninterrupted runs are shared by the module: the R1 `:runlocal` pipeline (every stage 2 steps) and
one run of SFT, then PPO (the PPO baseline's stages), then DPO (the DPO config's stage) that the PPO and
DPO tests read; the runs killed inside a non-GRPO stage must reproduce them. Subprocesses see one CPU
device; the training runs share the session's compilation cache (tests/shared_runs.py), so a rerun or a
resume loads the programs its config's first run compiled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_runs import compilation_cache, with_compilation_cache

from grpo_jax.rewards import TokenSpec, make_reward_fns
from grpo_jax.testing import tiny_tokenizer
from grpo_jax.training.stages import STAGE_KINDS, stage_kind
from grpo_jax.training.stages.rejection_sampling import first_failed_rule, preference_pairs_from_candidates
from grpo_jax.training.stages.rollout import route_examples
from grpo_jax.training.state import reset_reference

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
R1 = f"--config={REPO / 'configs' / 'r1_pipeline.py'}:runlocal"
R1_STAGES = ("sft", "grpo", "rejection_sampling", "rm", "sft2", "grpo_final")
R1_KINDS = ("sft", "grpo", "rejection_sampling", "rm", "sft", "grpo")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def train(
    config: str, workdir: Path, *overrides: str, timeout: float = 600, cache: Path | None = None
) -> subprocess.CompletedProcess:
    """scripts/train.py; `cache`: the compilation cache to load programs from and store them in."""
    command = [sys.executable, str(SCRIPT), config, f"--workdir={workdir}", *overrides]
    env = _env() if cache is None else with_compilation_cache(_env(), cache)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def metric_lines(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def without_timing(line: dict) -> dict:
    """A line without what differs between processes: timings and the process's compile count."""
    return {k: v for k, v in line.items() if not k.endswith("time_s") and k != "compiles"}


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# configs/ppo_baseline.py's stages (SFT, then PPO with its critic) followed by configs/dpo.py's DPO stage,
# which starts from PPO's result (`init_from="previous"`) and takes it as its reference. Global steps: SFT
# 1-2, PPO 3-4, DPO 5-8.
_PPO_THEN_DPO = f"""
from grpo_jax.config_utils import sibling_config

def get_config(arg=None):
    config = sibling_config(__file__, {str(REPO / "configs" / "ppo_baseline.py")!r}, arg)
    config.stages = ("sft", "ppo", "dpo")
    config.dpo = sibling_config(__file__, {str(REPO / "configs" / "dpo.py")!r}, arg).dpo
    return config
"""
DPO_OVERRIDES = ("--config.dpo.steps=4", "--config.dpo.learning_rate=1e-3")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def r1_run(tmp_path_factory, xla_cache) -> Path:
    workdir = tmp_path_factory.mktemp("r1")
    assert_ok(train(R1, workdir, cache=xla_cache))
    return workdir


@pytest.fixture(scope="module")
def ppo_dpo_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "ppo_then_dpo.py"
    path.write_text(_PPO_THEN_DPO)
    return f"--config={path}:runlocal"


@pytest.fixture(scope="module")
def ppo_dpo_run(tmp_path_factory, ppo_dpo_config, xla_cache) -> Path:
    workdir = tmp_path_factory.mktemp("ppo_dpo")
    assert_ok(train(ppo_dpo_config, workdir, *DPO_OVERRIDES, cache=xla_cache))
    return workdir


# ------------------------------------------------------------------------------------------------
# The R1 pipeline
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_r1_pipeline_runs_all_six_stages(r1_run):
    summary = json.loads((r1_run / "summary.json").read_text())
    assert set(summary["stages"]) == set(R1_STAGES)  # summary.json is written with sorted keys
    assert tuple(summary["stages"][name]["kind"] for name in R1_STAGES) == R1_KINDS
    assert 0.0 <= summary["stages"]["rm"]["heldout_pair_accuracy"] <= 1.0
    for name in R1_STAGES:
        assert (r1_run / "stages" / name / "result").is_dir(), name

    lines = metric_lines(r1_run)
    train_lines = [x for x in lines if x["stage"] != "eval"]
    assert [x["stage"] for x in train_lines] == [kind for kind in R1_KINDS for _ in range(2)]
    assert [x["step"] for x in train_lines] == list(range(1, 13))
    rm_lines = [x for x in train_lines if x["stage"] == "rm"]
    assert {"loss", "rm/accuracy", "heldout/rm/accuracy"} <= set(rm_lines[-1])
    # All-scenario RL: the reward model scores the "open" rows inside the step, the verifier the others.
    final = train_lines[-1]
    assert {"reward/reward_model", "reward/accuracy", "reward/language_consistency"} <= set(final)
    # The reward model does not evaluate as a policy: no eval line belongs to it.
    assert {x["train_stage"] for x in lines if x["stage"] == "eval"} == set(R1_STAGES) - {
        "rm",
        "rejection_sampling",
    }


@pytest.mark.slow
def test_iterative_grpo_retrains_the_reward_model_with_replay(r1_run):
    """`grpo_final.rm_retrain_every=1` in the runlocal pipeline: after each RL step the reward model in
    TrainState.reward_params takes Bradley-Terry steps on new pairs plus >= 10 % historical ones."""
    final = [x for x in metric_lines(r1_run) if x["stage"] == "grpo"][-2:]
    for line in final:
        assert line["rm_retrain/param_delta"] > 0
        assert line["rm_retrain/new_pairs"] + line["rm_retrain/replay_pairs"] == 4  # steps x batch
        assert line["rm_retrain/replay_pairs"] >= 0.1 * 4
    first_grpo = [x for x in metric_lines(r1_run) if x["stage"] == "grpo"][0]
    assert not any(k.startswith("rm_retrain/") for k in first_grpo)  # the switch is off in that stage


def test_pairs_from_groups_pairs_correct_over_incorrect_in_verifiable_groups():
    from grpo_jax.training.stages.rm_retrain import pairs_from_groups

    examples = [{"prompt": "p"}] * 2 + [{"prompt": "q", "route": "open"}] * 2 + [{"prompt": "r"}] * 2
    pairs = pairs_from_groups(
        ["a", "b", "c", "d", "e", "f"], examples, [False, True, True, False, True, True], 2
    )
    assert pairs == [{"prompt": "p", "chosen": "b", "rejected": "a"}]


@pytest.mark.slow
def test_rejection_set_holds_only_kept_samples_mixed_three_to_one(r1_run):
    folder = r1_run / "stages" / "rejection_sampling"
    candidates = read_jsonl(folder / "candidates.jsonl")
    rows = read_jsonl(folder / "sft.jsonl")
    assert len(candidates) == 2 * 2 * 4  # steps x prompts x samples
    kept = {(c["prompt"], c["completion"]) for c in candidates if c["dropped_by"] is None}
    reasoning = [r for r in rows if r["source"] == "reasoning"]
    other = [r for r in rows if r["source"] == "non_reasoning"]
    assert reasoning and all((r["prompt"], r["completion"]) in kept for r in reasoning)
    assert len(other) == round(len(reasoning) / 3)
    counts = json.loads((r1_run / "summary.json").read_text())["stages"]["rejection_sampling"]
    assert counts["rejection_sampling"]["num_written"] == len(rows)


@pytest.mark.slow
def test_rerunning_a_finished_pipeline_changes_nothing(r1_run, xla_cache):
    files = (
        "metrics.jsonl",
        "stages/rejection_sampling/sft.jsonl",
        "stages/rejection_sampling/candidates.jsonl",
    )
    before = {name: (r1_run / name).read_bytes() for name in files}
    assert_ok(train(R1, r1_run, cache=xla_cache))
    assert {name: (r1_run / name).read_bytes() for name in files} == before


# Runs scripts/train.py unchanged except that the process hangs right after writing the metrics line of
# global step HANG_AFTER of stage kind HANG_STAGE, so the test can SIGKILL it at a known point.
_HANGING_TRAIN = f"""
import os, runpy, sys, time
from grpo_jax import metrics
hang_after, hang_stage = int(os.environ["HANG_AFTER"]), os.environ["HANG_STAGE"]
write = metrics.MetricsWriter.write
def hanging_write(self, step, stage, values):
    line = write(self, step, stage, values)
    if stage == hang_stage and step == hang_after:
        time.sleep(3600)
    return line
metrics.MetricsWriter.write = hanging_write
sys.argv[0] = {str(SCRIPT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _checkpoint_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, kills",
    [("r1", (("rejection_sampling", 6), ("rm", 8))), ("ppo_dpo", (("ppo", 4), ("dpo", 6)))],
    ids=["r1-rejection_sampling-then-rm", "ppo-then-dpo"],
)
def test_sigkill_inside_a_non_grpo_stage_then_rerun_reproduces_the_run(
    request, tmp_path, xla_cache, run, kills
):
    """Killed after the line of `step` (its checkpoint is `step - 1`), the rerun truncates the metrics
    (and the rejection candidates) back and reproduces every line and every file of the uninterrupted
    run: rejection sampling, reward-model training, PPO with its critic, DPO with its reference. Each
    run is killed twice in a row, in its second stage to resume, then again in the next such stage of
    the resumed process, before the final rerun: the R1 pipeline in rejection sampling, then in the
    reward model's stage; SFT-PPO-DPO mid-PPO (its critic and optimizer state restored), then mid-DPO
    (its reference rebuilt from PPO's result)."""
    baseline = request.getfixturevalue(f"{run}_run")
    config, overrides = {
        "r1": (R1, ()),
        "ppo_dpo": (request.getfixturevalue("ppo_dpo_config"), DPO_OVERRIDES),
    }[run]
    workdir = tmp_path / "run"
    for stage, step in kills:
        _kill_after(config, workdir, overrides, stage, step, xla_cache)
        assert metric_lines(workdir)[-1]["step"] == step

    result = train(config, workdir, *overrides, cache=xla_cache)
    assert_ok(result)
    assert "resuming from" in result.stderr
    resumed, expected = metric_lines(workdir), metric_lines(baseline)
    assert [without_timing(x) for x in resumed] == [without_timing(x) for x in expected]
    if run == "r1":
        folder = "stages/rejection_sampling"
        for name in ("candidates.jsonl", "sft.jsonl", "pairs.jsonl"):
            assert (workdir / folder / name).read_bytes() == (baseline / folder / name).read_bytes(), name


def _kill_after(config, workdir, overrides, stage: str, step: int, cache: Path) -> None:
    """Run (or resume) `config` in workdir and SIGKILL it once the line of global `step` of stage kind
    `stage` is written and the checkpoint of `step - 1` exists."""
    env = dict(with_compilation_cache(_env(), cache), HANG_AFTER=str(step), HANG_STAGE=stage)
    command = [sys.executable, "-c", _HANGING_TRAIN, config, f"--workdir={workdir}", *overrides]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None:
            path = workdir / "metrics.jsonl"
            text = path.read_text() if path.exists() else ""
            done = [json.loads(x) for x in text.splitlines(keepends=True) if x.endswith("\n")]
            if step - 1 in _checkpoint_steps(workdir) and any(x["step"] == step for x in done):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it was killed"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


# ------------------------------------------------------------------------------------------------
# The baselines
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_baseline_runlocal_trains_a_critic(ppo_dpo_run):
    ppo = [x for x in metric_lines(ppo_dpo_run) if x["stage"] == "ppo"]
    assert len(ppo) == 2
    assert {"reward/mean", "kl", "clip_frac", "vf_loss", "value_mean", "advantage/mean_abs"} <= set(ppo[0])
    assert all(x["nonfinite_updates"] == 0 for x in ppo)
    assert ppo[-1]["kl"] != 0  # the policy moved off its reference (k1 estimate: either sign)


@pytest.mark.slow
def test_a_dpo_stage_starts_at_log2_and_raises_pair_accuracy(ppo_dpo_run):
    dpo = [x for x in metric_lines(ppo_dpo_run) if x["stage"] == "dpo"]
    assert len(dpo) == 4
    assert dpo[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at the first step
    assert dpo[0]["dpo/reward_accuracy"] == 0.0  # all margins are exactly 0
    assert dpo[-1]["dpo/reward_accuracy"] > 0.5 and dpo[-1]["loss"] < dpo[0]["loss"]
    assert dpo[-1]["heldout/dpo/reward_accuracy"] > 0.5  # pairs from the test split, never trained on


@pytest.mark.slow
def test_process_supervision_runlocal_trains_on_step_rewards(tmp_path, xla_cache):
    config = f"--config={REPO / 'configs' / 'quickstart_process.py'}:runlocal"
    assert_ok(train(config, tmp_path, cache=xla_cache))
    grpo = [x for x in metric_lines(tmp_path) if x["stage"] == "grpo"]
    assert len(grpo) == 2 and {"process/step_reward_mean", "process/steps_per_sample"} <= set(grpo[0])
    assert grpo[0]["process/steps_per_sample"] > 0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.sft2.init_from=grpo_final", "config.sft2.init_from='grpo_final': expected"),
        ("--config.sft2.data=stage:sft2", "config.sft2.data='stage:sft2': 'sft2' is not an earlier stage"),
        ("--config.grpo_final.reward_model_from=sft", "must name an earlier 'rm' stage"),
        ("--config.sft2.init_from=rm", "'rm', whose result is a reward model, not a policy"),
        ('--config.stages=("sft", "rm", "grpo")', "'rm', whose result is a reward model, not a policy"),
    ],
)
def test_bad_stage_wiring_fails_before_anything_is_written(tmp_path, override, expected):
    result = train(R1, tmp_path, override, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


def test_stage_kinds_are_registered_and_matched_by_longest_prefix():
    assert set(STAGE_KINDS) == {"sft", "grpo", "rm", "rejection_sampling", "ppo", "dpo"}
    assert [stage_kind(n) for n in ("sft2", "grpo_final", "rm", "rejection_sampling", "ppo_big")] == [
        "sft",
        "grpo",
        "rm",
        "rejection_sampling",
        "ppo",
    ]
    with pytest.raises(ValueError, match="unknown stage 'reward'"):
        stage_kind("reward")


def test_routed_rewards_apply_only_to_their_rows():
    tokenizer = tiny_tokenizer()
    spec = TokenSpec.from_tokenizer(tokenizer)
    fn = make_reward_fns(
        [("length_penalty", 1.0, {"max_len": 2, "on": "open"}), ("length_penalty", 2.0, {"max_len": 2})], spec
    )
    batch = {
        "completion_tokens": jnp.ones((4, 4), jnp.int32),
        "completion_mask": jnp.ones((4, 4), jnp.int32),
        "route": jnp.array([0, 1, 0, 1], jnp.int32),
    }
    total, parts = fn(batch)
    plain = parts["length_penalty_2"]
    assert np.all(np.asarray(plain) != 0)
    np.testing.assert_allclose(parts["length_penalty"], np.asarray(plain) * np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(total, parts["length_penalty"] + 2 * np.asarray(plain))
    with pytest.raises(ValueError, match="'on' must be one of"):
        make_reward_fns([("length_penalty", 1.0, {"max_len": 2, "on": "closed"})], spec)


def test_route_examples_is_a_stable_fraction():
    examples = [{"prompt": f"{i}+{i}"} for i in range(2000)]
    routed = route_examples(examples, 0.25)
    share = np.mean([e["route"] == "open" for e in routed])
    assert 0.22 < share < 0.28
    assert route_examples(examples[::-1], 0.25)[::-1] == routed  # order does not matter
    assert route_examples(examples, 0.0) is examples


def test_keep_rules_and_pairs_from_candidates():
    keep = [("accuracy", 1.0), ("format", 1.0)]
    assert first_failed_rule({"accuracy": 1.0, "format": 1.0}, keep) is None
    assert first_failed_rule({"accuracy": 0.0, "format": 0.0}, keep) == "accuracy"
    assert first_failed_rule({"accuracy": 1.0, "format": float("nan")}, keep) == "format"
    assert first_failed_rule({"accuracy": 1.0}, keep) == "format"
    rows = [
        {"prompt": "a", "completion": "good", "kept": True},
        {"prompt": "a", "completion": "bad", "kept": False},
        {"prompt": "b", "completion": "good", "kept": True},  # nothing to reject: no pair
    ]
    assert preference_pairs_from_candidates(rows, seed=0) == [
        {"prompt": "a", "chosen": "good", "rejected": "bad"}
    ]


def test_after_a_reference_reset_the_reference_equals_the_params():
    from grpo_jax.testing import tiny_model_config, tiny_params
    from grpo_jax.training.stages.grpo import GRPOStage
    from grpo_jax.training.state import TrainState

    config = tiny_model_config()
    params, moved = tiny_params(config, 0), tiny_params(config, 1)
    state = TrainState(
        step=jnp.asarray(2), params=moved, opt_state=(), ref_params=params, reward_params={}, rng=None
    )
    equal = lambda a, b: all(
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), a, b))
    )
    assert not equal(state.ref_params, state.params)
    assert equal(reset_reference(state).ref_params, moved)

    stage = GRPOStage.__new__(GRPOStage)  # only after_update's schedule is exercised
    stage.grpo, stage.retrainer = type("Algo", (), {"reference_reset_every": 2})(), None
    stage.reference_from = "sft"  # the reference equals sft's saved result: checkpoints leave it out
    assert equal(stage.after_update(state.replace(step=jnp.asarray(3)))[0].ref_params, params)  # step 3: kept
    assert stage.reference_from == "sft"
    assert equal(stage.after_update(state)[0].ref_params, moved)  # step 2: reset
    assert stage.reference_from is None  # from now on every checkpoint stores the reference

    bf16 = state.replace(ref_params=jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
    reset = reset_reference(bf16).ref_params  # a bf16 reference stays bf16 (no recompile)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(reset))
    assert equal(reset, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), moved))


def test_the_initial_model_is_held_only_while_a_later_stage_starts_from_it():
    """The R1 pipeline's sft2 starts from the base (`init_from="base"`): the initial model is loaded for
    stage 0, kept through grpo, rejection_sampling and rm, and dropped once sft2 is built; the previous
    stage's result is dropped after every build (later stages read it from disk)."""
    import types

    from grpo_jax.config_utils import sibling_config
    from grpo_jax.training.trainer import Run

    config = sibling_config(str(REPO / "configs" / "r1_pipeline.py"), "r1_pipeline.py", "runlocal")
    stages = list(config.stages)
    assert stages == ["sft", "grpo", "rejection_sampling", "rm", "sft2", "grpo_final"]
    loads = []
    run = Run(config, "", None, None, None, None, None, None, None, {}, {}, {})
    run.load_base = lambda: loads.append(1) or types.SimpleNamespace(name="base")
    assert [run.start_source(i) for i in range(len(stages))] == [None, "sft", "grpo", "sft", None, "sft2"]
    held = []
    for index in range(len(stages)):
        if run.start_source(index) is None:
            assert run.init_params(index).name == "base"
        run.previous = ("x", object())
        run.release_start_params(index)
        held.append(run.base is not None)
        assert run.previous is None
    assert held == [True, True, True, True, False, False]
    assert len(loads) == 1  # loaded for stage 0 and still held when sft2 starts from it


def test_a_stage_reads_its_own_task_or_file(tmp_path):
    """`config.<stage>.task` replaces the run's task for that stage; `data` names a JSONL file or
    `stage:NAME`, a file an earlier stage wrote under DIR/stages/NAME."""
    import types

    import ml_collections

    from grpo_jax.config_utils import sibling_config
    from grpo_jax.training import setup

    config = sibling_config(str(REPO / "configs" / "r1_pipeline.py"), "r1_pipeline.py", "runlocal")
    config.grpo_final.task = ml_collections.ConfigDict(
        dict(name="arithmetic", kwargs=dict(num_digits=(3, 3)), train_size=5, test_size=2, train_file="")
    )
    run = types.SimpleNamespace(config=config, workdir=str(tmp_path), task=setup.build_task(config))
    assert setup.stage_task(run, "grpo") is run.task
    own = setup.stage_task(run, "grpo_final").train
    assert len(own) == 5 and all(len(e["prompt"].split("+")[0]) == 3 for e in own)

    folder = tmp_path / "stages" / "rejection_sampling"
    folder.mkdir(parents=True)
    (folder / "sft.jsonl").write_text('{"prompt": "1+2", "completion": "<answer> 3 </answer>"}\n')
    assert [e["prompt"] for e in setup.stage_sft_examples(run, "sft2")] == ["1+2"]
    assert setup.stage_sft_examples(run, "sft") is run.task.train
    config.sft2.data = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="config.sft2.data: no such file"):
        setup.check_data_spec(config, "sft2")


@pytest.mark.slow
def test_raising_steps_on_the_command_line_extends_a_finished_stage(tmp_path, xla_cache):
    quickstart = f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal"
    assert_ok(train(quickstart, tmp_path, "--config.stages=sft", "--config.sft.steps=2", cache=xla_cache))
    result = train(quickstart, tmp_path, "--config.stages=sft", "--config.sft.steps=4", cache=xla_cache)
    assert_ok(result)
    assert "extending it to config.sft.steps=4" in result.stderr
    lines = metric_lines(tmp_path)
    assert [(x["stage"], x["step"]) for x in lines if x["stage"] == "sft"] == [
        ("sft", s) for s in (1, 2, 3, 4)
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["step"] for e in summary["stages"]["sft"]["evals"]] == [2, 4]
    assert _checkpoint_steps(tmp_path)[-1] == 4
