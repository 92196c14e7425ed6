"""What the end-to-end tests share within one pytest session, so the suite trains each thing once:

- `quickstart_run(...)`: one quickstart `:runlocal` workdir with every checkpoint kept, read by the
  script, sampling-settings and notebook tests (each test leaves it as it found it).

It lives under the session's base temporary folder, made on first use (like test_train_script's
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
        env = one_device_env()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    return workdir
