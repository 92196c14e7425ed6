"""Two processes, one run: scripts/train.py started as TWO local processes with 4 fake CPU
devices each (JAX's multi-controller runtime over gloo CPU collectives, the path a TPU pod takes) on a
(data, fsdp, tensor) = (2, 2, 2) mesh that spans both, must write the metrics.jsonl of the same run in one
process (SFT, evals, and GRPO with a NaN step and a host reward), from process 0 only, and leave
checkpoints a one-process rerun resumes from.

The run is tests/test_train_script.py's baseline on a GSM8K-style JSONL task (one-digit sums, `#### N`
answers) whose accuracy is scored on the host (`math_accuracy`, the math verifier); a 40-step SFT
teaches the answer format, so the host reward is 1 on some rows and 0 on others. The mesh puts the fsdp
axis across the two processes (`config.dcn_mesh=(1, 2, 1)`, each host a "slice"), so each process holds
row blocks 0 and 2, or 1 and 3, of every batch, not one contiguous half: each process scores its own
rows, and a reward landing on another row would change the advantages and every metric after it. Each
process reads its own slice of the data (`shard_index=process_index`); group statistics are computed on
the global batch inside the step.

Forty SFT steps at this learning rate amplify float rounding (sharded reductions sum in another order)
past the comparison's 1e-5, so the two processes start from the one-process run's checkpoint two SFT
steps before its end (a one-process checkpoint resumed by two processes) and run SFT's last two steps,
its eval and GRPO's first two steps, the NaN one included.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from shared_runs import compilation_cache
from test_sharding import FakeHostDevice
from test_train_script import (
    BASELINE,
    REPO,
    RUNLOCAL,
    _command,
    _env,
    assert_ok,
    assert_same_run,
    checkpoint_steps,
    metric_lines,
    train,
)

from grpo_jax import sharding

SFT_STEPS = 40


def gsm8k_task(directory: Path) -> tuple[str, ...]:
    """Write train.jsonl (64 lines) and test.jsonl (8) of GSM8K-style sums a+b <= 9 with bare `#### N`
    answers (the demonstration is `<think>  </think> <answer> N </answer>`); return the overrides that
    run the baseline on them with the answer checked on the host instead of in the graph."""
    sums = [(a, b) for a in range(1, 9) for b in range(1, 10 - a)]
    problems = [sums[(7 * i) % len(sums)] for i in range(72)]
    for split, part in (("train", problems[:64]), ("test", problems[64:])):
        lines = [json.dumps({"question": f"{a}+{b}", "answer": f"#### {a + b}"}) for a, b in part]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    replaced = ("--config.grpo.rewards=", "--config.debug.poison_step=")
    return (
        *(o for o in BASELINE if not o.startswith(replaced)),
        '--config.grpo.rewards=(("format", 0.2), ("length_penalty", 1.0, {"max_len": 12}))',
        '--config.grpo.host_rewards=(("math_accuracy", 1.0),)',
        # Close to greedy, so the briefly trained policy's answers are right on some rows, wrong on others
        "--config.grpo.algo.temperature=0.35",
        "--config.task.name=gsm8k",
        "--config.task.kwargs={}",
        f"--config.task.train_file={directory / 'train.jsonl'}",
        f"--config.task.test_file={directory / 'test.jsonl'}",
        f"--config.sft.steps={SFT_STEPS}",
        "--config.sft.learning_rate=1e-2",
        "--config.sft.warmup_steps=0",
        "--config.sft.schedule=constant",
        "--config.sft.eval_every=1000",  # evaluated at its end only
        f"--config.sft.checkpoint_every={SFT_STEPS - 2}",  # and at its end: where the two processes start
        "--config.checkpoint.keep_last=8",  # keeps it to the end
        f"--config.debug.poison_step={SFT_STEPS + 2}",  # GRPO's second update is NaN and skipped
    )


# Values that are rounding noise in this run rather than results, compared to absolute bounds (the rest as
# tests/test_train_script.py compares runs): GRPO's first loss is -mean(advantage) = 0 up to rounding
# (every completion has the same length), and after SFT at 1e-2 the policy's KL to its reference
# (~5e-4) moves by ~2e-8 with the rounding of the first Adam steps, whose size barely depends on the
# gradient's (sign(g) for tiny g).
ROUNDING_NOISE = {"loss": 1e-6, "pg_loss": 1e-6, "kl": 1e-7}


def assert_same(got: dict, want: dict) -> None:
    for key, bound in ROUNDING_NOISE.items():
        if isinstance(want.get(key), float):
            assert abs(got[key] - want[key]) <= bound, (want["stage"], want["step"], key, got[key], want[key])
    drop = lambda line: {k: v for k, v in line.items() if k not in ROUNDING_NOISE or not isinstance(v, float)}
    assert_same_run(drop(got), drop(want))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_two_processes(
    workdir, *overrides: str, timeout: float = 400, config: str = RUNLOCAL
) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(
                workdir,
                *overrides,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                config=config,
            ),
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_processes_write_the_one_process_run(tmp_path, tmp_path_factory):
    run = gsm8k_task(tmp_path)
    reference = tmp_path / "reference"
    cache = compilation_cache(tmp_path_factory)  # the final one-process resume loads the reference's programs
    assert_ok(train(reference, *run, cache=cache))
    want = metric_lines(reference)
    stages = ["sft"] * SFT_STEPS + ["eval", "grpo", "grpo", "eval"]
    assert [x["stage"] for x in want] == stages + ["grpo", "grpo", "eval"]
    grpo = [x for x in want if x["stage"] == "grpo"]
    assert all(0 <= x["host_reward/math_accuracy"] <= 1 for x in grpo)
    assert any(0 < x["host_reward/math_accuracy"] < 1 for x in grpo), "the host reward should vary by row"
    assert grpo[1]["nonfinite_updates"] == 1.0

    # The two-process mesh: process p's devices are the fsdp = p column, so its rows are not one block.
    hosts = [FakeHostDevice(id=i, process_index=i // 4) for i in range(8)]
    layout = sharding.hybrid_device_array((2, 2, 2), (1, 2, 1), hosts)
    assert [{d.process_index for d in block.flat} for block in layout.reshape(4, 2)] == [{0}, {1}, {0}, {1}]

    workdir = tmp_path / "run"
    start = SFT_STEPS - 2
    shutil.copytree(reference, workdir)
    for step in checkpoint_steps(workdir):
        if step > start:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    two_process = ("--config.mesh=2,2,2", "--config.dcn_mesh=1,2,1", "--config.grpo.steps=2")
    results = train_two_processes(workdir, *run, *two_process)
    for result in results:
        assert_ok(result)
    assert f"at stage sft step {start}" in results[0].stderr
    assert "wall time" in results[0].stdout and "wall time" not in results[1].stdout  # process 0 reports
    lines = metric_lines(workdir)
    assert [x["stage"] for x in lines] == stages
    for got, expected in zip(lines[start:], want[start : len(stages)], strict=True):
        assert_same(got, expected)

    # The checkpoints both processes wrote resume in ONE process on one device: GRPO's steps 3-4 equal
    # the reference's (the stage is extended from 2 to its 4 steps).
    assert checkpoint_steps(workdir)[-1] == SFT_STEPS + 2
    assert_ok(train(workdir, *run, cache=cache))
    lines = metric_lines(workdir)
    assert [(x["stage"], x["step"]) for x in lines] == [(x["stage"], x["step"]) for x in want]
    for got, expected in zip(lines[len(stages) :], want[len(stages) :], strict=True):
        assert_same(got, expected)


# ------------------------------------------------------------------------------------------------
# Asynchronous GRPO on two processes (docs/ARCHITECTURE.md, "Asynchronous GRPO")
# ------------------------------------------------------------------------------------------------

ASYNC_CONFIG = """
import importlib.util

import ml_collections

spec = importlib.util.spec_from_file_location("quickstart", {quickstart!r})
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)


def get_config(arg=None):
    # tests/test_async.py's GRPO-only quickstart:runlocal (8 prompts x G = 4, a reward that varies,
    # decoupled PPO), the sampler on a (2 replica, 2 tensor) mesh, the trainer on a (2, 2, 1) mesh; then a
    # second GRPO stage with rollouts one step ahead: k = 0 and k = 1 in one run, programs compiled once.
    c = quickstart.get_config("runlocal")
    c.stages = ("grpo", "grpo_k1")
    c.tensorboard = False
    c.mesh = (2, 2, 1)
    c.sampler_mesh = (2, 2)
    c.grpo.update(
        steps=2, prompts_per_step=8, eval_every=0, eval_at_end=False, checkpoint_every=100, learning_rate=1e-2
    )
    c.grpo.rewards = (("format", 0.2), ("accuracy", 1.0), ("length_penalty", 1.0, {{"max_len": 12}}))
    c.grpo.algo.dynamic_sampling_refill = False
    c.grpo.algo.is_correction = "token_tis"
    c.grpo_k1 = ml_collections.ConfigDict(c.grpo.to_dict())
    c.grpo_k1.update(steps=3, off_policy_steps=1)
    return c
"""


@pytest.mark.slow
def test_two_processes_with_a_sampler_mesh_write_the_one_process_run(tmp_path):
    """Two processes of 4 fake CPU devices each, every one giving 2 devices to the sampler's mesh and 2
    to the trainer's (`sharding.split_devices`), so the weight sync goes through the mirror
    (`rollout.weight_sync.move_to`) and each rollout comes back row by row in each process; k = 0 (stage
    `grpo`) then k = 1 (`grpo_k1`). Every metric of every step equals the one-process run with the same
    4 + 4 split: the rollouts exactly (tokens, lengths, rewards, lags), the float statistics to the
    repository's cross-run tolerance (tests/test_train_script.py's `assert_same_run`, rel 1e-5; observed:
    a few ulp). Not bit for bit because a reduction over the trainer's 4 devices now crosses processes, where
    gloo's all-reduce adds the 2 + 2 partial sums in another order than XLA's in-process all-reduce adds
    the 4 (e.g. `reward/mean` -0.7552083730697632 against -0.7552083134651184)."""
    config = tmp_path / "async_config.py"
    config.write_text(ASYNC_CONFIG.format(quickstart=str(REPO / "configs" / "quickstart.py")))
    reference = tmp_path / "one_process"
    assert_ok(train(reference, devices=8, config=f"--config={config}"))
    want = metric_lines(reference)
    assert [(x["stage"], x["step"]) for x in want] == [("grpo", s) for s in range(1, 6)]  # lines by kind
    assert [x.get("pipeline/lag") for x in want] == [None, None, 0.0, 1.0, 1.0]
    assert all(x["sync/bytes"] > 0 for x in want)

    workdir = tmp_path / "two_processes"
    for result in train_two_processes(workdir, config=f"--config={config}", timeout=300):
        assert_ok(result)
    got = metric_lines(workdir)
    # kl: assert_same_run's absolute 1e-9 is for a policy next to its reference; here KL ~0.03 (observed
    # difference 1.4e-7 relative), so it is held to the same rel 1e-5 as the other statistics.
    skip = ("sync/time", "pipeline/sample", "kl")
    drop = lambda x: {k: v for k, v in x.items() if not k.startswith(skip)}
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert_same_run(drop(mine), drop(theirs))
        assert mine["kl"] == pytest.approx(theirs["kl"], rel=1e-5)
        assert mine["sync/bytes"] == theirs["sync/bytes"]
