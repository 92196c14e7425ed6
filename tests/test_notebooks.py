"""Every notebook under notebooks/ runs top to bottom without an error (its own asserts included).

With nbclient and ipykernel installed (the [dev] extra) each notebook runs in a fresh Jupyter kernel, as a
reader would run it; without them its code cells run in order in one namespace in this process, so the
check never silently disappears.

Every notebook runs in its shrunken mode: the suite sets `GRPO_JAX_NOTEBOOK_SMOKE=1` (SMOKE_ENV), which a
notebook reads to train `:runlocal` configs instead of its reader-sized runs. The notebooks that study a
finished training run (READS_A_WORKDIR) are given the session's quickstart `:runlocal` workdir
(tests/shared_runs.py, SFT then GRPO with every checkpoint kept) through `GRPO_JAX_WORKDIR`, as a reader
points them at their own run, instead of each training the same run again.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from shared_runs import quickstart_run

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SMOKE_ENV = "GRPO_JAX_NOTEBOOK_SMOKE"
WORKDIR_ENV = "GRPO_JAX_WORKDIR"
READS_A_WORKDIR = ("01_grpo_anatomy", "02_training_dynamics")
CELL_TIMEOUT_S = 600  # a smoke notebook's cell may train a :runlocal config in a subprocess
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
    env[SMOKE_ENV] = "1"  # also set by the test, with WORKDIR_ENV where the notebook reads a run
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute(env=env)


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for name in (
        "grpo_walkthrough.ipynb",
        "01_grpo_anatomy.ipynb",
        "02_training_dynamics.ipynb",
        "03_ablations.ipynb",
    ):
        assert name in names, names


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem[:2].isdigit()], ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    """The numbered notebooks are stored clean (the walkthrough keeps its outputs as rendered reading)."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path_factory):
    monkeypatch.setenv(SMOKE_ENV, "1")
    if path.stem in READS_A_WORKDIR:
        assert WORKDIR_ENV in path.read_text(), f"{path.name} no longer reads {WORKDIR_ENV}"
        monkeypatch.setenv(WORKDIR_ENV, str(quickstart_run(tmp_path_factory)))
    if HAS_JUPYTER:
        _run_in_kernel(path)
        return
    namespace = {"__name__": "__main__"}
    for index, source in enumerate(_code_cells(path)):
        exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)  # noqa: S102
