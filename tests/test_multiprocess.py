"""Two processes, one run: scripts/train.py started as TWO local processes with 4 fake CPU
devices each (JAX's multi-controller runtime over gloo CPU collectives, the path a TPU pod takes) on a
(data, fsdp, tensor) = (2, 2, 2) mesh that spans both, must write the metrics.jsonl of the one-process
baseline run of tests/test_train_script.py (SFT, evals, and GRPO with its NaN step), from process 0 only,
and leave checkpoints a one-process rerun resumes from.

Each process reads its own slice of the data (`shard_index=process_index`); rollouts are gathered for
eval decoding; group statistics are computed on the global batch inside the step.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from test_train_script import (
    BASELINE,
    _command,
    _env,
    assert_ok,
    assert_same_run,
    checkpoint_steps,
    metric_lines,
    reference_run,
    train,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_two_processes(workdir, *overrides: str, timeout: float = 400) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(
                workdir,
                *overrides,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
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
def test_two_processes_write_the_one_process_run(tmp_path_factory, tmp_path):
    baseline = reference_run(tmp_path_factory)
    workdir = tmp_path / "run"
    results = train_two_processes(workdir, *BASELINE, "--config.mesh=2,2,2", "--config.grpo.steps=2")
    for result in results:
        assert_ok(result)
    assert "wall time" in results[0].stdout and "wall time" not in results[1].stdout  # process 0 reports
    lines, one_process = metric_lines(workdir), metric_lines(baseline)[:6]
    assert [x["stage"] for x in lines] == ["sft", "sft", "eval", "grpo", "grpo", "eval"]
    for got, want in zip(lines, one_process, strict=True):
        assert_same_run(got, want)

    # The checkpoints both processes wrote resume in ONE process on one device: GRPO steps 5-6 equal
    # the baseline's (the stage is extended from 2 to its 4 steps).
    assert checkpoint_steps(workdir)[-1] == 4
    assert_ok(train(workdir, *BASELINE))
    lines = metric_lines(workdir)
    assert [(x["stage"], x["step"]) for x in lines] == [
        (x["stage"], x["step"]) for x in metric_lines(baseline)
    ]
    for got, want in zip(lines[6:], metric_lines(baseline)[6:], strict=True):
        assert_same_run(got, want)
