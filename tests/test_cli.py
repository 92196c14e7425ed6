"""The user's commands: every `scripts/NAME.py` is the console entry point `grpo-NAME` (setup.py) and
`python -m grpo_jax.cli.NAME`, the same code three ways (docs/CONTRACTS.md)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r'"(grpo-[a-z-]+) = grpo_jax\.cli\.(\w+):entry_point"')


def _entry_points() -> dict[str, str]:
    return dict(ENTRY.findall((REPO / "setup.py").read_text()))


def test_every_script_is_a_console_entry_point_of_the_same_code():
    entries = _entry_points()
    scripts = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
    assert sorted(entries.values()) == scripts
    for command, module_name in entries.items():
        assert command == "grpo-" + module_name.replace("_", "-")
        # Read, not imported: each command defines its absl flags at import, once per process.
        source = ast.parse((REPO / "grpo_jax" / "cli" / f"{module_name}.py").read_text())
        assert "entry_point" in [n.name for n in source.body if isinstance(n, ast.FunctionDef)], module_name
        tree = ast.parse((REPO / "scripts" / f"{module_name}.py").read_text())
        imports = [(n.module, [a.name for a in n.names]) for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert imports == [(f"grpo_jax.cli.{module_name}", ["entry_point"])], module_name


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def test_the_three_ways_to_run_train_give_the_same_one_line_error(tmp_path):
    args = [
        f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal",
        f"--workdir={tmp_path}",
        "--config.nope=1",
    ]
    ways = [
        [sys.executable, str(REPO / "scripts" / "train.py")],
        [sys.executable, "-m", "grpo_jax.cli.train"],
    ]
    installed = shutil.which("grpo-train")  # present after `pip install -e .` (as CI installs)
    if installed:
        ways.append([installed])
    errors = []
    for way in ways:
        result = subprocess.run(way + args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, way
        errors.append(result.stderr.strip().splitlines()[-1])
    assert errors[0].startswith("error: --config.nope: the config has no key 'nope'"), errors[0]
    assert all(error == errors[0] for error in errors), errors
    assert not list(tmp_path.iterdir())  # nothing written
