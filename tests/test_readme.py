"""The README's "Use it from Python" example runs as written (on the suite's 8 fake CPU devices)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_python_example_runs_and_updates():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(x)) for r in rows for x in r[1:])
    assert float(rows[-1][2]) > 0  # the policy moved away from the reference: the update happened
