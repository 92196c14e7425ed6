"""Every notebook under notebooks/ runs top to bottom without an error (its own asserts included).

With nbclient and ipykernel installed (the [dev] extra) each notebook runs in a fresh Jupyter kernel, as a
reader would run it; without them its code cells run in order in one namespace in this process, so the
check never silently disappears.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
HAS_JUPYTER = all(importlib.util.find_spec(name) for name in ("nbclient", "nbformat", "ipykernel"))


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _run_in_kernel(path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ)  # one CPU device: the walkthrough needs no mesh and compiles faster
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute(env=env)


def test_there_are_notebooks():
    assert "grpo_walkthrough.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    if HAS_JUPYTER:
        _run_in_kernel(path)
        return
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(_code_cells(path)):
        exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)  # noqa: S102
