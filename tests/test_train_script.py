"""scripts/train.py end to end (docs/CONTRACTS.md), run as a subprocess with `configs/quickstart.py:runlocal`.

One shared baseline run (SFT 2 steps, GRPO 4 steps, a NaN injected at global step 4, a length reward so
GRPO really updates the weights) is checked for the metrics.jsonl contract, the run's files and its
compile counts, and is the reference the 8-device run and every resumed run (tests/test_resume.py) must
reproduce line for line; it is made once per test session (`reference_run`). The bad-input tests check
that each mistake exits non-zero with one clear last line on stderr and leaves no checkpoint behind.
Subprocesses see ONE CPU device (faster) unless the test is about the 8-device mesh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from shared_runs import compilation_cache, with_compilation_cache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
RUNLOCAL = f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal"

# SFT steps 1-2, GRPO steps 3-6 (global numbering); the GRPO update at global step 4 gets a NaN gradient.
# Checkpoints after every step; keep-last 3 evicts 1-3 by the end (the best, 6, is also among the last).
POISON_STEP = 4
BASELINE = (
    "--config.grpo.steps=4",
    # 4 prompts (16 completions) per step, so the 8-device run's data x fsdp = 4 split takes the same batch
    "--config.grpo.prompts_per_step=4",
    "--config.checkpoint.keep_last=3",
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


def _command(
    workdir: Path, *overrides: str, script: tuple[str, ...] = (str(SCRIPT),), config: str = RUNLOCAL
) -> list[str]:
    return [sys.executable, *script, config, f"--workdir={workdir}", *overrides]


def train(
    workdir: Path,
    *overrides: str,
    devices: int = 1,
    timeout: float = 300,
    cache: Path | None = None,
    config: str = RUNLOCAL,
) -> subprocess.CompletedProcess:
    """scripts/train.py `config` (default RUNLOCAL) in workdir; `cache`: load and store programs in that
    compilation cache (tests/shared_runs.py), for runs whose subject is not compilation."""
    env = _env(devices) if cache is None else with_compilation_cache(_env(devices), cache)
    return subprocess.run(
        _command(workdir, *overrides, config=config),
        cwd=REPO,
        env=env,
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


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted BASELINE run, made once per test session for every module that compares against
    it (summary.json, written last, marks it finished). Read-only: tests copy it before changing it.
    It compiles every program itself (no compilation cache): its `compiles` counts are checked below."""
    workdir = tmp_path_factory.getbasetemp() / "baseline"
    if not (workdir / "summary.json").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        assert_ok(train(workdir, *BASELINE))
    return workdir


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return compilation_cache(tmp_path_factory)


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
    the NaN step, later steps, evals and checkpoints reuse the same programs (docs/ARCHITECTURE.md)."""
    counts = {(x["stage"], x["step"]): x["compiles"] for x in metric_lines(baseline) if x["stage"] != "eval"}
    assert counts[("sft", 1)] > 0, "the counter sees no compilation at all"
    assert counts[("grpo", 3)] > counts[("sft", 2)], "GRPO's sampler and step compile at its first step"
    assert counts[("grpo", 4)] == counts[("grpo", 5)] == counts[("grpo", 6)], counts


@pytest.mark.slow
def test_too_many_nan_updates_in_a_row_stop_the_run_and_a_rerun_continues_it(tmp_path, xla_cache):
    stopped = (
        "--config.stages=grpo",
        "--config.grpo.steps=3",
        "--config.debug.poison_step=2",
        "--config.max_nonfinite_in_a_row=1",
    )
    result = train(tmp_path, *stopped, cache=xla_cache)
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert message.startswith("error: ") and "1 non-finite updates in a row" in message, message
    assert "lower the learning rate" in message and "Traceback" not in result.stderr
    lines = metric_lines(tmp_path)
    assert [(x["step"], x["nonfinite_updates"]) for x in lines] == [(1, 0.0), (2, 1.0)]  # the stop is logged
    assert checkpoint_steps(tmp_path) == [1]  # the last good state; the stop never saves a later one
    first = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)[0]

    # Follow the message: rerun with a lower learning rate (and, the divergence being injected, without
    # the poison). The run continues from step 1 with the new rate; nothing before the stop is lost or
    # written twice, and the stopped step's line is replaced.
    result = train(tmp_path, *stopped[:-2], "--config.grpo.learning_rate=1e-5", cache=xla_cache)
    assert_ok(result)
    assert "resuming from" in result.stderr and "at stage grpo step 1" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text().startswith(first)
    lines = metric_lines(tmp_path)
    expected = [("grpo", 1), ("grpo", 2), ("eval", 2), ("grpo", 3), ("eval", 3)]
    assert [(x["stage"], x["step"]) for x in lines] == expected
    assert [x["nonfinite_updates"] for x in lines if x["stage"] == "grpo"] == [0.0, 0.0, 0.0]
    assert [x["learning_rate"] for x in lines if x["stage"] == "grpo"][1:] == [pytest.approx(1e-5)] * 2
    assert lines[0]["learning_rate"] == pytest.approx(1e-4)
    assert checkpoint_steps(tmp_path)[-1] == 3


# How closely the 8-device run reproduces the one-device one. Counts (completion lengths, truncations,
# zero-variance groups, clipped tokens, 0/1 rewards, eval results), the learning rate and non-floats are
# compared exactly: same seed, so the same tokens are sampled. Every other value is a float32 reduction,
# compared to within 1e-5 relative: sharded matmuls and the global group statistics sum in another order,
# which moved such values by at most ~5e-7 relative here (a few ulps). The sampler/trainer mismatch
# metrics ARE float noise, so they get an absolute bound of a few ulps of what they measure: |sampler -
# trainer logprob| (max and mean, ~5e-7 either way), ratios exp(that) (1 + a few 1.2e-7 ulps); and `kl`, a
# mean of ~delta^2/2 for log-ratios delta ~1e-3, so a 4e-7 rounding of a logprob moves it by ~delta * 4e-7
# = 4e-10 (and it is ~1e-15 vs exactly 0 at the first GRPO step, where policy and reference are equal).
EXACT_PREFIXES = ("completion_len/", "eval/", "clip_frac")
EXACT = (
    "truncated_frac",
    "truncated_masked_frac",
    "zero_variance_frac",
    "reward/accuracy",
    "reward/format",
    "nonfinite_updates",
    "learning_rate",
    "prompt_truncated_frac",
)
NOISE_ABS = {
    "sampler_logprob_diff": 5e-6,
    "mismatch/abs_logp_diff_max": 5e-6,
    "mismatch/abs_logp_diff_mean": 5e-6,
    "ratio_max": 2e-6,
    "mismatch/ratio_p01": 2e-6,
    "mismatch/ratio_p50": 2e-6,
    "mismatch/ratio_p99": 2e-6,
    "kl": 1e-9,
}


def assert_same_run(got: dict, want: dict) -> None:
    where = (want["stage"], want["step"])
    got, want = without_timing(got), without_timing(want)
    assert set(got) == set(want), (where, set(got) ^ set(want))
    for key, value in want.items():
        if key in EXACT or key.startswith(EXACT_PREFIXES) or not isinstance(value, float):
            assert got[key] == value, (where, key, got[key], value)
        elif key in NOISE_ABS:
            assert got[key] == pytest.approx(value, rel=0, abs=NOISE_ABS[key]), (where, key, got[key], value)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5), (where, key, got[key], value)


@pytest.mark.slow
def test_runs_on_an_8_device_mesh_and_matches_one_device(tmp_path, baseline):
    """The baseline's SFT and first two GRPO steps (the NaN one included) and their evals on a
    (data, fsdp, tensor) = (2, 2, 2) mesh: batches split over 4 devices, so a group's completions span
    devices and the group statistics are global; GRPO's constant schedule does not depend on the
    stage's length, so stopping after 2 of its 4 steps changes nothing before."""
    result = train(tmp_path, *BASELINE, "--config.mesh=2,2,2", "--config.grpo.steps=2", devices=8)
    assert_ok(result)
    lines, one_device = metric_lines(tmp_path), metric_lines(baseline)[:6]
    assert [(x["stage"], x["step"]) for x in lines] == [(x["stage"], x["step"]) for x in one_device]
    assert [x["stage"] for x in lines] == ["sft", "sft", "eval", "grpo", "grpo", "eval"]
    assert set(RL_KEYS) <= set(lines[3])
    for got, want in zip(lines, one_device, strict=True):
        assert_same_run(got, want)


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


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
        # the whole of stderr is that one line: get_config()'s traceback is cut down to its last line
        assert result.stderr.strip().splitlines() == [last_line(result.stderr)], result.stderr[-3000:]
