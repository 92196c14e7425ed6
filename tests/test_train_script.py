"""scripts/train.py end to end (DESIGN.md §3), run as a subprocess with `configs/quickstart.py:runlocal`.

One shared baseline run (SFT 2 steps, GRPO 4 steps, a NaN injected at global step 4, a length reward so
GRPO really updates the weights) is checked for the metrics.jsonl contract, the run's files and its
compile counts, and is the reference a SIGKILLed-then-resumed run must reproduce line for line. The
bad-input tests check that each mistake exits non-zero with one clear last line on stderr and leaves no
checkpoint behind.
Subprocesses see ONE CPU device (faster) unless the test is about the 8-device mesh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
RUNLOCAL = f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal"

# SFT steps 1-2, GRPO steps 3-6 (global numbering); the GRPO update at global step 4 gets a NaN gradient.
POISON_STEP = 4
BASELINE = (
    "--config.grpo.steps=4",
    f"--config.debug.poison_step={POISON_STEP}",
    # A reward that varies between completions of an untrained model, so advantages, gradients and the
    # optimizer state are non-zero and a resume that lost any of them would show in the metrics.
    '--config.grpo.rewards=(("format", 0.2), ("accuracy", 1.0), ("length_penalty", 1.0, {"max_len": 12}))',
)
RL_KEYS = (
    "reward/mean",
    "reward/std",
    "kl",
    "clip_frac",
    "entropy",
    "completion_len/mean",
    "truncated_frac",
    "loss",
    "step_time_s",
)


def _env(devices: int) -> dict[str, str]:
    """The test process's environment with XLA faking `devices` CPU devices (conftest's 8 removed)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _command(workdir: Path, *overrides: str, script: tuple[str, ...] = (str(SCRIPT),)) -> list[str]:
    return [sys.executable, *script, RUNLOCAL, f"--workdir={workdir}", *overrides]


def train(
    workdir: Path, *overrides: str, devices: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, *overrides),
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def metric_lines(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def without_timing(line: dict) -> dict:
    """A line without what differs between processes: timings and the process's compile count."""
    return {k: v for k, v in line.items() if not k.endswith("time_s") and k != "compiles"}


def checkpoint_steps(workdir: Path) -> list[int]:
    """Finished checkpoints (orbax renames `N.orbax-checkpoint-tmp*` to `N` once complete)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def summary_evals(workdir: Path) -> dict[str, list[dict]]:
    stages = json.loads((workdir / "summary.json").read_text())["stages"]
    return {name: [without_timing(e) for e in stage["evals"]] for name, stage in stages.items()}


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("baseline")
    result = train(workdir, *BASELINE)
    assert_ok(result)
    return workdir


# ------------------------------------------------------------------------------------------------
# Has a pulse
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_baseline_writes_the_metrics_contract_and_run_files(baseline):
    lines = metric_lines(baseline)
    for line in lines:
        assert isinstance(line["step"], int) and line["stage"] in ("sft", "grpo", "eval"), line
    assert [(x["stage"], x["step"]) for x in lines] == [
        ("sft", 1),
        ("sft", 2),
        ("eval", 2),
        ("grpo", 3),
        ("grpo", 4),
        ("eval", 4),
        ("grpo", 5),
        ("grpo", 6),
        ("eval", 6),
    ]
    for line in lines:
        if line["stage"] == "grpo":
            assert set(RL_KEYS) <= set(line), sorted(set(RL_KEYS) - set(line))
        if line["stage"] == "sft":
            assert {"loss", "step_time_s", "grad_norm"} <= set(line)
        if line["stage"] == "eval":
            assert 0.0 <= line["eval/accuracy"] <= 1.0
            assert line["eval/num_problems"] == 8
    grpo = [x for x in lines if x["stage"] == "grpo"]
    assert max(x["reward/std"] for x in grpo) > 0, "the length reward should vary within the batch"
    assert grpo[-1]["kl"] > 0, "GRPO updates should move the policy away from its reference"
    assert all(x["completion_len/mean"] > 0 for x in grpo)

    for name in ("summary.json", "curves.png", "config.json", "tokenizer.model"):
        assert (baseline / name).is_file(), name
    assert (baseline / "tensorboard").is_dir()
    assert checkpoint_steps(baseline)[-1] == 6  # the final state is always saved
    summary = json.loads((baseline / "summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "grpo"}
    assert [e["step"] for e in summary["stages"]["grpo"]["evals"]] == [4, 6]
    assert summary["stages"]["grpo"]["final_eval_accuracy"] == lines[-1]["eval/accuracy"]
    saved = json.loads((baseline / "config.json").read_text())
    assert saved["grpo"]["steps"] == 4 and saved["debug"]["poison_step"] == POISON_STEP


@pytest.mark.slow
def test_a_nan_update_is_skipped_and_counted(baseline):
    grpo = {x["step"]: x for x in metric_lines(baseline) if x["stage"] == "grpo"}
    assert {step: x["nonfinite_updates"] for step, x in grpo.items()} == {3: 0.0, 4: 1.0, 5: 0.0, 6: 0.0}
    assert grpo[POISON_STEP]["loss"] is None and "loss" in grpo[POISON_STEP]["nonfinite"]
    assert all("nonfinite" not in x for step, x in grpo.items() if step != POISON_STEP)
    assert grpo[5]["loss"] is not None


@pytest.mark.slow
def test_the_steps_do_not_recompile(baseline):
    """`compiles` (XLA compilations so far in the process) grows while SFT and then GRPO compile their
    programs, and stays flat once the first GRPO step, its checkpoint and the first GRPO eval are done:
    the NaN step, later steps, evals and checkpoints reuse the same programs (DESIGN.md §1)."""
    counts = {(x["stage"], x["step"]): x["compiles"] for x in metric_lines(baseline) if x["stage"] != "eval"}
    assert counts[("sft", 1)] > 0, "the counter sees no compilation at all"
    assert counts[("grpo", 3)] > counts[("sft", 2)], "GRPO's sampler and step compile at its first step"
    assert counts[("grpo", 4)] == counts[("grpo", 5)] == counts[("grpo", 6)], counts


@pytest.mark.slow
def test_too_many_nan_updates_in_a_row_stop_the_run(tmp_path):
    result = train(
        tmp_path,
        "--config.stages=grpo",
        "--config.grpo.steps=3",
        "--config.debug.poison_step=2",
        "--config.max_nonfinite_in_a_row=1",
    )
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert message.startswith("error: ") and "1 non-finite updates in a row" in message, message
    assert "Traceback" not in result.stderr
    lines = metric_lines(tmp_path)
    assert [(x["step"], x["nonfinite_updates"]) for x in lines] == [(1, 0.0), (2, 1.0)]  # the stop is logged
    assert checkpoint_steps(tmp_path) == [1]  # the last good state; the stop never saves a later one


@pytest.mark.slow
def test_runs_on_an_8_device_mesh_and_matches_one_device(tmp_path, baseline):
    result = train(
        tmp_path,
        "--config.mesh=2,2,2",
        "--config.grpo.prompts_per_step=4",  # batches are split over data x fsdp = 4 devices
        "--config.sft.steps=1",
        "--config.grpo.steps=1",
        devices=8,
    )
    assert_ok(result)
    lines = metric_lines(tmp_path)
    assert [(x["stage"], x["step"]) for x in lines] == [("sft", 1), ("eval", 1), ("grpo", 2), ("eval", 2)]
    assert set(RL_KEYS) <= set(lines[2])
    # Step 1 only depends on the init (same seed) and the first batch, not on how they are sharded.
    one_device = metric_lines(baseline)[0]
    assert lines[0]["loss"] == pytest.approx(one_device["loss"], rel=1e-5)
    assert lines[0]["grad_norm"] == pytest.approx(one_device["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------

# Runs scripts/train.py unchanged except that the process hangs right after writing the metrics line of
# global step HANG_AFTER, so the test can SIGKILL it at a known point: checkpoint HANG_AFTER-1 on disk,
# one metrics line past it.
_HANGING_TRAIN = f"""
import os, runpy, sys, time
from grpo_jax import metrics
hang_after, write = int(os.environ["HANG_AFTER"]), metrics.MetricsWriter.write
def hanging_write(self, step, stage, values):
    line = write(self, step, stage, values)
    if stage == "grpo" and step == hang_after:
        time.sleep(3600)
    return line
metrics.MetricsWriter.write = hanging_write
sys.argv[0] = {str(SCRIPT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _complete_lines(workdir: Path) -> list[dict]:
    """metrics.jsonl lines fully written so far (the run may be writing the next one)."""
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.mark.slow
def test_sigkill_mid_grpo_then_rerun_reproduces_the_uninterrupted_run(tmp_path, baseline):
    resume_from = 5  # a GRPO checkpoint after the NaN step, so the resumed run carries its counters
    workdir, log = tmp_path / "run", tmp_path / "killed_run.log"
    env = dict(_env(1), HANG_AFTER=str(resume_from + 1))
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            _command(workdir, *BASELINE, script=("-c", _HANGING_TRAIN)),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            steps = [x["step"] for x in _complete_lines(workdir)]
            if resume_from in checkpoint_steps(workdir) and resume_from + 1 in steps:
                break
            time.sleep(0.2)
        assert process.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
        assert resume_from in checkpoint_steps(workdir), "timed out waiting for the checkpoint"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = metric_lines(workdir)
    assert killed[-1]["step"] == resume_from + 1  # a line past the checkpoint, which the resume must drop

    result = train(workdir, *BASELINE)
    assert_ok(result)
    assert "resuming from" in result.stderr
    resumed, expected = metric_lines(workdir), metric_lines(baseline)
    assert [(x["stage"], x["step"]) for x in resumed] == [(x["stage"], x["step"]) for x in expected]
    for got, want in zip(resumed, expected, strict=True):
        assert without_timing(got) == without_timing(want), (got["stage"], got["step"])
    assert summary_evals(workdir) == summary_evals(baseline)  # eval history survives the kill too


@pytest.mark.slow
def test_resume_with_a_different_model_size_is_refused(tmp_path, baseline):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    before = {p: p.read_bytes() for p in (workdir / "metrics.jsonl", workdir / "config.json")}
    result = train(workdir, *BASELINE, "--config.model.hidden_size=64")
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert message.startswith("error: checkpoint in ") and "hidden_size=32" in message, message
    assert "says 64" in message and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in before} == before  # the old run's files are untouched
    assert checkpoint_steps(workdir) == checkpoint_steps(baseline)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing a resume would trust
# ------------------------------------------------------------------------------------------------

_GOOD_GSM8K = '{"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5 #### 5"}\n'


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("--config.foo=1",), "error: --config.foo: the config has no key 'foo'"),
        (("--config.grpo.algo.clip_eps_lo=0.1",), "no key 'clip_eps_lo' (Did you mean \"clip_eps_low\""),
        (("--config.sft.steps=abc",), "error: flag --config.sft.steps=abc: invalid literal for int()"),
        (
            ("--config.grpo.algo.clip_eps_low=2.0",),
            "error: GRPOConfig.clip_eps_low must be in (0, 1), got 2.0",
        ),
        (("--config.mesh=3,1,1",), "needs 3 devices but 1 are available"),
        (('--config.stages=("sft", "foo")',), "config.stages: unknown stage 'foo'"),
        (
            (
                "--config.task.name=gsm8k",
                "--config.task.train_file=/nope.jsonl",
                "--config.task.test_file=/nope.jsonl",
            ),
            "error: config.task.kwargs: ['num_digits', 'operations'] are not options of task 'gsm8k'",
        ),
        (
            (
                "--config.task.name=gsm8k",
                "--config.task.kwargs={}",
                "--config.task.train_file=/nope.jsonl",
                "--config.task.test_file=/nope.jsonl",
            ),
            "error: Task file not found: /nope.jsonl",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-nested-key",
        "bad-type",
        "bad-algo-value",
        "mesh-too-big",
        "unknown-stage",
        "task-kwargs",
        "missing-file",
    ],
)
def test_a_bad_config_exits_with_one_line(tmp_path, overrides, expected):
    workdir = tmp_path / "run"
    result = train(workdir, *overrides, timeout=120)
    assert result.returncode != 0
    assert expected in last_line(result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(workdir) == []
    assert not (workdir / "metrics.jsonl").exists()


def test_a_batch_the_mesh_cannot_split_is_refused_before_training(tmp_path):
    result = train(tmp_path, "--config.mesh=2,2,2", devices=8, timeout=120)
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert message.startswith(
        "error: config.grpo.prompts_per_step=2 must be divisible by the data-parallel size 4"
    ), message
    assert checkpoint_steps(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


def test_a_malformed_jsonl_line_is_named(tmp_path):
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text(_GOOD_GSM8K * 2 + '{"question": "What is 1+1?", "answer": "2 #### 2"\n')
    test_file.write_text(_GOOD_GSM8K)
    workdir = tmp_path / "run"
    result = train(
        workdir,
        "--config.task.name=gsm8k",
        "--config.task.kwargs={}",
        f"--config.task.train_file={train_file}",
        f"--config.task.test_file={test_file}",
        timeout=120,
    )
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert message.startswith(f"error: {train_file}:3: invalid JSON"), message
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(workdir) == [] and not (workdir / "metrics.jsonl").exists()


def test_a_missing_config_file_or_variant_is_one_line(tmp_path):
    for config, expected in (
        (
            "--config=configs/nope.py",
            "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'",
        ),
        ("--config=configs/quickstart.py:nope", "ValueError: configs/quickstart.py: unknown variant 'nope'"),
    ):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), config, f"--workdir={tmp_path}"],
            cwd=REPO,
            env=_env(1),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert expected in last_line(result.stderr), result.stderr[-3000:]
        assert "Traceback (most recent call last)" not in last_line(result.stderr)
