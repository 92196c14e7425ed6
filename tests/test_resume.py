"""Resume, end to end: runs of scripts/train.py killed (SIGKILL) or left with a damaged checkpoint, then
rerun, must reproduce the uninterrupted baseline run of tests/test_train_script.py line for line (every
metric except timings and the process's compile count) and its eval history.

Baseline (BASELINE there): SFT global steps 1-2, GRPO 3-6 with a NaN update at 4, a checkpoint after
every step, keep-last 3. Where each test resumes from:

  checkpoint 1  mid-SFT               killed while orbax writes checkpoint 2 (a real save, not a fake)
  checkpoint 2  the SFT -> GRPO boundary (SFT's final checkpoint)   killed in the first GRPO step, then
  checkpoint 3  the first GRPO checkpoint                           killed again in the second
  checkpoint 5  after keep-last evicted 1-3   newest checkpoint damaged (extra file missing, meta
  checkpoint 4  right after the NaN step      JSON truncated; array files truncated)

(the stop after too many non-finite updates, rerun with a lower learning rate, is in
test_train_script.py next to the stop itself). Subprocesses see one CPU device. The killed and resumed
runs share the session's compilation cache (tests/shared_runs.py): the first one compiles BASELINE's
programs, the others load them; the baseline itself compiles its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from shared_runs import compilation_cache, with_compilation_cache
from test_train_script import (
    BASELINE,
    SCRIPT,
    _command,
    _env,
    assert_ok,
    checkpoint_steps,
    metric_lines,
    reference_run,
    summary_evals,
    train,
    without_timing,
)

from grpo_jax.checkpointing import Checkpointer, checkpoint_directory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return compilation_cache(tmp_path_factory)


def assert_reproduces(workdir: Path, baseline: Path) -> None:
    resumed, expected = metric_lines(workdir), metric_lines(baseline)
    assert [(x["stage"], x["step"]) for x in resumed] == [(x["stage"], x["step"]) for x in expected]
    for got, want in zip(resumed, expected, strict=True):
        assert without_timing(got) == without_timing(want), (got["stage"], got["step"])
    assert summary_evals(workdir) == summary_evals(baseline)  # the eval history survives too


# ------------------------------------------------------------------------------------------------
# SIGKILL at a known point
# ------------------------------------------------------------------------------------------------

# scripts/train.py unchanged, except that it hangs at the point the environment names, so the test can
# SIGKILL it there:
#   HANG_AFTER=STAGE:STEP   right after writing the metrics line of global step STEP of stage kind STAGE;
#   HANG_SAVE=STEP          inside orbax's save of checkpoint STEP, after every item (state, extra, meta)
#                           is written to `STEP.orbax-checkpoint-tmp*` and before the rename that commits
#                           it; the path of that folder is written to HANG_MARKER first.
_HANGING_TRAIN = f"""
import os, pathlib, runpy, sys, time
from grpo_jax import metrics
from orbax.checkpoint._src.path import atomicity

hang_after, hang_save = os.environ.get("HANG_AFTER"), os.environ.get("HANG_SAVE")
write, finalize = metrics.MetricsWriter.write, atomicity.AtomicRenameTemporaryPath.finalize

def hanging_write(self, step, stage, values):
    line = write(self, step, stage, values)
    if hang_after == f"{{stage}}:{{step}}":
        time.sleep(3600)
    return line

async def hanging_finalize(self, *args, **kwargs):
    if self.get_final().name == hang_save:
        pathlib.Path(os.environ["HANG_MARKER"]).write_text(str(self.get()))
        time.sleep(3600)  # blocks orbax's commit thread; the trainer blocks at its next save
    return await finalize(self, *args, **kwargs)

metrics.MetricsWriter.write = hanging_write
atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize
sys.argv[0] = {str(SCRIPT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _complete_lines(workdir: Path) -> list[dict]:
    """metrics.jsonl lines fully written so far (the run may be writing the next one)."""
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def run_and_kill(
    workdir: Path,
    log: Path,
    cache: Path,
    ready,
    *,
    config: str | None = None,
    overrides=BASELINE,
    deadline_s: float = 240,
    devices: int = 1,
    **hang: str,
) -> None:
    """Run BASELINE (or `config` with `overrides`) on `devices` CPU devices with the hang points `hang`
    (environment variables) and SIGKILL it once `ready()` holds; fails if the run ends first or `ready`
    takes over `deadline_s` seconds."""
    env = dict(with_compilation_cache(_env(devices), cache), **hang)
    config = {} if config is None else {"config": config}
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            _command(workdir, *overrides, script=("-c", _HANGING_TRAIN), **config),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.time() + deadline_s
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(0.2)
        assert process.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
        assert ready(), f"timed out waiting for the hang point {hang}:\n{log.read_text()[-3000:]}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(
    tmp_path, baseline, xla_cache
):
    """Killed inside orbax's save of SFT's final checkpoint 2 (every item written to the temporary
    folder, not yet committed): the rerun ignores that folder, resumes mid-SFT from checkpoint 1, and
    reproduces the run; the half-written folder is cleaned up."""
    workdir, marker = tmp_path / "run", tmp_path / "hang_marker"
    killed = tmp_path / "killed.log"
    run_and_kill(workdir, killed, xla_cache, marker.exists, HANG_SAVE="2", HANG_MARKER=str(marker))
    unfinished = Path(marker.read_text())
    assert unfinished.parent == workdir / "checkpoints" and unfinished.name.startswith(
        "2.orbax-checkpoint-tmp"
    )
    assert {"state", "extra", "meta"} <= {p.name for p in unfinished.iterdir()}  # really being written
    assert checkpoint_steps(workdir) == [1]
    assert [x["step"] for x in metric_lines(workdir)][:3] == [1, 2, 2]  # step 2 and its eval, to be dropped

    result = train(workdir, *BASELINE, cache=xla_cache)
    assert_ok(result)
    assert "at stage sft step 1" in result.stderr and "is damaged" not in result.stderr
    assert_reproduces(workdir, baseline)
    assert not unfinished.exists()
    assert checkpoint_steps(workdir) == checkpoint_steps(baseline)


@pytest.mark.slow
def test_killed_twice_in_a_row_then_rerun_reproduces_the_run(tmp_path, baseline, xla_cache):
    """Killed in the first GRPO step (newest checkpoint: SFT's final one, so GRPO restarts from SFT's
    saved result), rerun and killed again in the second GRPO step (the NaN one; newest checkpoint: the
    first GRPO step's), rerun to the end: each resume drops the lines past its checkpoint."""
    workdir = tmp_path / "run"

    def after(step: int, checkpoint: int):
        return lambda: (
            checkpoint in checkpoint_steps(workdir)
            and any(x["stage"] == "grpo" and x["step"] == step for x in _complete_lines(workdir))
        )

    run_and_kill(workdir, tmp_path / "killed1.log", xla_cache, after(3, 2), HANG_AFTER="grpo:3")
    assert metric_lines(workdir)[-1]["step"] == 3 and checkpoint_steps(workdir)[-1] == 2

    run_and_kill(workdir, tmp_path / "killed2.log", xla_cache, after(4, 3), HANG_AFTER="grpo:4")
    assert "resuming from" in (log := (tmp_path / "killed2.log").read_text()) and "at stage sft step 2" in log
    assert metric_lines(workdir)[-1]["step"] == 4 and checkpoint_steps(workdir)[-1] == 3
    # GRPO's reference still equals sft's saved result: checkpoint 3 does not store it a second time (the
    # resume below rebuilds it from stages/sft/result); the SFT checkpoint has none to store.
    with Checkpointer(checkpoint_directory(workdir), read_only=True) as checkpointer:
        assert checkpointer.read_extra(3)["reference_from"] == "sft"
        assert not [k for k in checkpointer.read_meta(3)["leaves"] if k.startswith("ref_params")]
        assert [k for k in checkpointer.read_meta(3)["leaves"] if k.startswith("params/")]

    result = train(workdir, *BASELINE, cache=xla_cache)
    assert_ok(result)
    assert "at stage grpo step 1" in result.stderr
    assert_reproduces(workdir, baseline)


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ------------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _drop_extra_file(checkpoints: Path) -> int:
    (checkpoints / "6" / "extra" / "metadata").unlink()
    return 6


def _truncate_meta_json(checkpoints: Path) -> int:
    _truncate(checkpoints / "6" / "meta" / "metadata")
    return 6


def _truncate_the_array_files(checkpoints: Path) -> int:
    shutil.rmtree(checkpoints / "6")  # as if killed before saving 6: checkpoint 5's arrays are needed
    # Every data file, cut in half: which of them hold arrays (OCDBT also leaves superseded tree nodes
    # that no read touches) is up to the concurrent writes.
    for path in (checkpoints / "5" / "state" / "ocdbt.process_0" / "d").iterdir():
        _truncate(path)
    return 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, problem, resumes_at",
    [
        (_drop_extra_file, "extra: missing file", "grpo step 3"),
        (_truncate_meta_json, "meta: not valid JSON", "grpo step 3"),
        (_truncate_the_array_files, "state: unreadable: ", "grpo step 2"),
    ],
    ids=["extra-file-missing", "meta-json-truncated", "array-files-truncated"],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(
    tmp_path, baseline, xla_cache, damage, problem, resumes_at
):
    """One warning line names the step and what is wrong; the damaged folder is moved to
    `<step>.damaged`, the rerun resumes from the step before and reproduces the run, saving the
    damaged step afresh. The array damage only shows when the arrays are read (at the restore)."""
    assert checkpoint_steps(baseline) == [4, 5, 6]  # keep-last evicted 1-3: resumes after an eviction
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    checkpoints = workdir / "checkpoints"
    damaged = damage(checkpoints)

    result = train(workdir, *BASELINE, cache=xla_cache)
    assert_ok(result)
    warnings = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1, warnings
    assert f"checkpoint step {damaged} in {checkpoints} is damaged: {problem}" in warnings[0], warnings[0]
    assert warnings[0].startswith("W") and f"moved it to {damaged}.damaged" in warnings[0]
    assert f"at stage {resumes_at}" in result.stderr
    # not even from orbax's reads abandoned after the failed one (see orbax_adapters.quiet_abandoned_reads)
    for noise in ("Traceback", "Exception ignored", "never retrieved", "Encountered error"):
        assert noise not in result.stderr, noise
    assert_reproduces(workdir, baseline)
    assert checkpoint_steps(workdir) == checkpoint_steps(baseline)
    assert (checkpoints / f"{damaged}.damaged").is_dir()


@pytest.mark.slow
def test_when_every_checkpoint_is_damaged_the_run_stops_with_one_error_line(tmp_path, baseline):
    """Nothing intact to resume from: one error line naming the folder, non-zero exit, no traceback,
    the metrics untouched; and a second rerun says the same instead of starting over."""
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    checkpoints = workdir / "checkpoints"
    for step in checkpoint_steps(workdir):
        _truncate(checkpoints / str(step) / "extra" / "metadata")
    before = (workdir / "metrics.jsonl").read_bytes()

    for _rerun in range(2):
        result = train(workdir, *BASELINE, timeout=120)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:") or re.match(r"[EF]\d{4} ", line)]
        assert errors == [lines[-1]], errors
        assert errors[0].startswith(f"error: no intact checkpoint to resume from in {checkpoints}:")
        assert "4.damaged, 5.damaged, 6.damaged" in errors[0]
        assert "Traceback" not in result.stderr
        assert (workdir / "metrics.jsonl").read_bytes() == before
        assert checkpoint_steps(workdir) == []
