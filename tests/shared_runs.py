"""What the end-to-end tests share within one pytest session, so the suite trains and compiles each
thing once:

- `compilation_cache(...)`: a folder for JAX's persistent compilation cache that training and script
  subprocesses opt into (`with_compilation_cache(env, folder)`). The first run of a config compiles
  and stores its programs; a rerun, a resume or another run of the same programs loads them instead
  of compiling (docs/ARCHITECTURE.md, compilation cache), with the same numbers
  (tests/test_compilation_cache.py checks that). Runs whose subject is compilation itself (the
  baseline's `compiles` counts, tests/test_compilation_cache.py) do not opt in: a program recompiled
  every step would be a cache hit there, not a compilation.
- `quickstart_run(...)`: one quickstart `:runlocal` workdir with every checkpoint kept, read by the
  script, sampling-settings and notebook tests (each test leaves it as it found it).
- `quickstart_script(...)`: scripts/sample.py or evaluate.py run once on that workdir with the run's own
  sampling settings (QUICKSTART_SAMPLE, QUICKSTART_EVALUATE), its stdout and `--out` file read by
  test_scripts (what the scripts print and write) and test_sample_defaults (which settings they used).

All live under the session's base temporary folder, made on first use (like test_train_script's
`reference_run`), so every module that asks gets the same one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The quickstart workdir: SFT steps 1-2 then GRPO steps 3-4, checkpoints 1-4 all kept; the GRPO stage
# samples at T=0.35 with top_k=1 (greedy), which tests/test_sample_defaults.py reads back as the run's
# rollout settings.
QUICKSTART_RUNLOCAL = f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal"
QUICKSTART_OVERRIDES = (
    "--config.checkpoint.keep_last=4",
    "--config.grpo.algo.temperature=0.35",
    "--config.grpo.top_k=1",
)


def one_device_env() -> dict[str, str]:
    """The test process's environment for a subprocess on one CPU device (conftest's 8 removed)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def compilation_cache(tmp_path_factory) -> Path:
    """The session's compilation cache folder (shared by every run that opts in)."""
    return tmp_path_factory.getbasetemp() / "xla_cache"


def with_compilation_cache(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` with JAX's persistent compilation cache in `folder`, keeping every program (JAX's defaults
    skip programs that compile in under a second: all of a tiny CPU run's). Set through JAX's own
    environment variables, so it reaches any script (train, sweep's runs, sample, evaluate) and leaves
    the runs' config.json as it would be."""
    return dict(
        env,
        JAX_COMPILATION_CACHE_DIR=str(folder),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )


# The one invocation of each script on the quickstart workdir (without flags that change the sampling).
QUICKSTART_SAMPLE = ("--prompt=12+34", "--prompt=7+8", "--num_samples=4", "--max_new_tokens=10")
QUICKSTART_EVALUATE = ("--k=4",)


def quickstart_run(tmp_path_factory) -> Path:
    """The quickstart workdir above, made once per session (summary.json, written last, marks it done)."""
    workdir = tmp_path_factory.getbasetemp() / "quickstart_run"
    if not (workdir / "summary.json").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        command = [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            QUICKSTART_RUNLOCAL,
            f"--workdir={workdir}",
            *QUICKSTART_OVERRIDES,
        ]
        env = with_compilation_cache(one_device_env(), compilation_cache(tmp_path_factory))
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def quickstart_script(tmp_path_factory, name: str) -> tuple[str, Path]:
    """`scripts/NAME --source=<quickstart_run> ARGS --out=OUT` (ARGS: QUICKSTART_SAMPLE for sample.py,
    QUICKSTART_EVALUATE for evaluate.py), run once per session; returns its stdout and OUT."""
    args = {"sample.py": QUICKSTART_SAMPLE, "evaluate.py": QUICKSTART_EVALUATE}[name]
    folder = tmp_path_factory.getbasetemp() / f"quickstart_{Path(name).stem}"
    out = folder / ("out.jsonl" if name == "sample.py" else "out.json")
    if not (folder / "stdout.txt").exists():  # written last: the run finished
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        workdir = quickstart_run(tmp_path_factory)
        command = [sys.executable, str(REPO / "scripts" / name), f"--source={workdir}", *args, f"--out={out}"]
        result = subprocess.run(
            command, cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / "stdout.txt").write_text(result.stdout)
    return (folder / "stdout.txt").read_text(), out
