"""Preemption: SIGTERM (what TPU VMs and SLURM send before they take the machine) makes scripts/train.py
finish the step in flight, save that step's checkpoint, exit with PREEMPTED_EXIT_CODE and one line; the
same command then resumes and reproduces the uninterrupted baseline run of tests/test_train_script.py
(shared, made once per session) line for line. The handler exists only while `train` runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import assert_reproduces
from test_train_script import (
    BASELINE,
    SCRIPT,
    _command,
    _env,
    assert_ok,
    checkpoint_steps,
    last_line,
    metric_lines,
    reference_run,
    train,
)

from grpo_jax.training import trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def test_sigterm_sets_the_stop_request_only_inside_training():
    """Importing the trainer installs nothing; inside `stop_on_sigterm` a real SIGTERM only sets the
    request (the process lives on); afterwards the previous handler is back."""
    earlier = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: earlier.append(signum))
    try:
        before = signal.getsignal(signal.SIGTERM)
        with trainer.stop_on_sigterm() as request:
            assert signal.getsignal(signal.SIGTERM) is not before
            assert not trainer.stop_agreed(request)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not request.is_set() and time.time() < deadline:
                time.sleep(0.01)
            assert request.is_set() and trainer.stop_agreed(request)  # one process: its own flag
        assert earlier == []  # the training handler took it, not the one it replaced
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


# Two processes call `stop_agreed` at the same four points; only process 1 gets SIGTERM, between the
# second and the third call. Each prints what it decided at each point.
_AGREEING_PROCESS = """
import os, signal, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from grpo_jax.training import trainer

decisions = []
with trainer.stop_on_sigterm() as request:
    for point in range(4):
        if point == 2 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            while not request.is_set():
                time.sleep(0.01)
        decisions.append(trainer.stop_agreed(request))
print("decisions", decisions, "own flag", request.is_set())
"""


def test_every_process_stops_at_the_step_where_any_process_got_sigterm():
    """A process that got SIGTERM never stops (and saves) alone: the other agrees at the same point."""
    from test_multiprocess import _free_port

    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AGREEING_PROCESS, address, str(i)],
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(last_line(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert outputs == [
        "decisions [False, False, True, True] own flag False",
        "decisions [False, False, True, True] own flag True",
    ]


# scripts/train.py unchanged, except that right after writing the metrics line of global step STEP of
# stage kind STAGE (PAUSE_AFTER=STAGE:STEP) it writes PAUSE_MARKER and waits (up to 2 minutes) until a
# SIGTERM has reached the trainer's handler, then goes on: the signal arrives at a known point mid-step.
_PAUSING_TRAIN = f"""
import os, pathlib, runpy, signal, sys, time
from grpo_jax import metrics

pause_after, marker = os.environ["PAUSE_AFTER"], pathlib.Path(os.environ["PAUSE_MARKER"])
write = metrics.MetricsWriter.write

def pausing_write(self, step, stage, values):
    line = write(self, step, stage, values)
    if f"{{stage}}:{{step}}" == pause_after:
        handler, received = signal.getsignal(signal.SIGTERM), []
        assert callable(handler), f"no SIGTERM handler while training: {{handler}}"
        def noting(signum, frame):
            received.append(signum)
            handler(signum, frame)
        signal.signal(signal.SIGTERM, noting)
        marker.write_text("paused")
        deadline = time.time() + 120
        while not received and time.time() < deadline:
            time.sleep(0.05)
        signal.signal(signal.SIGTERM, handler)
    return line

metrics.MetricsWriter.write = pausing_write
sys.argv[0] = {str(SCRIPT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# GRPO saves no checkpoint on schedule, so the one at the stop step can only be the preemption's.
PREEMPTED = (*BASELINE, "--config.grpo.checkpoint_every=1000")


@pytest.mark.slow
def test_sigterm_mid_grpo_saves_that_step_exits_75_and_the_rerun_reproduces_the_run(tmp_path, baseline):
    workdir, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "preempted.log"
    env = dict(_env(1), PAUSE_AFTER="grpo:3", PAUSE_MARKER=str(marker))
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            _command(workdir, *PREEMPTED, script=("-c", _PAUSING_TRAIN)),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and not marker.exists():
            time.sleep(0.2)
        assert marker.exists(), f"the run never reached GRPO step 3:\n{log.read_text()[-3000:]}"
        process.send_signal(signal.SIGTERM)  # while the first GRPO step (global step 3) is in flight
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = log.read_text()
    assert process.returncode == trainer.PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert last_line(stderr) == (
        "preempted: SIGTERM received; stopped after step 1 of stage grpo (global step 3); checkpoint 3 in "
        f"{workdir / 'checkpoints'} is the resume point; rerun the same command to continue"
    )
    assert "Traceback" not in stderr and not (workdir / "summary.json").exists()
    assert checkpoint_steps(workdir) == [1, 2, 3]  # SFT's two, then the preemption's at the stop step
    assert metric_lines(workdir)[-1]["step"] == 3  # nothing ran past the stop step

    result = train(workdir, *PREEMPTED)
    assert_ok(result)
    assert "at stage grpo step 1" in result.stderr
    assert_reproduces(workdir, baseline)
