"""scripts/sweep.py and configs/ablations/*.py (docs/CONTRACTS.md, sweeps).

Every ablation config parses, each of its points applies to its config (full and `:runlocal`), and a
2-point `:runlocal` sweep (`configs/ablations/kl_coef.py:runlocal --point=...`, one seed) runs end to end
as subprocesses: `--point=1` runs only that point; the sweep then runs the other one and skips the
finished one without touching its metrics; results.csv has one row per run with the documented columns,
and results.png is written. The cold-start SFT that every point shares runs once (`DIR/_shared/seed0`)
and a point that starts from it writes the same metrics as the point run from scratch
(`--noshare_stages`). A bad override key fails before any run with one line naming it. The sweep's runs
share the session's compilation cache (tests/shared_runs.py): a program compiled by one run is loaded by
the next that needs it.
"""

import csv
import functools
import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_runs import compilation_cache, with_compilation_cache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "sweep.py"
ABLATIONS = sorted(glob.glob(str(REPO / "configs" / "ablations" / "*.py")))


@functools.cache
def _sweep_module():
    """The sweep command's module (`grpo_jax.cli.sweep`, behind scripts/sweep.py)."""
    return importlib.import_module("grpo_jax.cli.sweep")


def _env() -> dict[str, str]:
    """One CPU device for the runs (conftest's 8 fake devices removed): runlocal batches are tiny."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def sweep(*args: str, timeout: float = 600, cache: Path | None = None) -> subprocess.CompletedProcess:
    """scripts/sweep.py; `cache`: the compilation cache its runs load programs from and store them in."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=_env() if cache is None else with_compilation_cache(_env(), cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_there_are_ablations():
    names = {Path(p).stem for p in ABLATIONS}
    assert {"loss_variants", "kl_coef", "group_size", "advantage", "dynamic_sampling", "temperature"} <= names


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: Path(p).stem)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_ablation_points_apply(path, arg):
    module = _sweep_module()
    config, points = module.load_sweep(path + (f":{arg}" if arg else ""))
    assert len(points) >= 2
    names = [module.point_name(p) for p in points]
    assert len(set(names)) == len(names), names
    for index, point in enumerate(points):
        assert module.overrides(point), point
        module.apply_point(config, point, index)  # raises on an unknown key or a bad value
    if arg == "runlocal":
        full, _ = module.load_sweep(path)
        assert config.grpo.steps < full.grpo.steps and config.sft.steps < full.sft.steps


def test_group_size_keeps_samples_per_step():
    module = _sweep_module()
    for arg in ("", ":runlocal"):
        config, points = module.load_sweep(str(REPO / "configs/ablations/group_size.py") + arg)
        samples = set()
        for point in points:
            c = module.apply_point(config, point)
            samples.add(c.grpo.prompts_per_step * c.grpo.algo.num_generations)
        assert len(samples) == 1, samples


def test_bad_key_fails_before_any_run(tmp_path):
    config = tmp_path / "bad.py"
    quickstart = str(REPO / "configs" / "quickstart.py")
    config.write_text(
        "from grpo_jax.config_utils import sibling_config\n"
        f"def get_config(arg=None):\n    return sibling_config(__file__, {quickstart!r}, arg)\n"
        "def get_sweep(arg=None):\n"
        "    return [{'grpo.algo.kl_coef': 0.0}, {'grpo.algo.kl_coeff': 0.1}]\n"
    )
    result = sweep(f"--config={config}:runlocal", f"--workdir={tmp_path / 'out'}", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "grpo.algo.kl_coeff" in errors[0], result.stderr
    assert not (tmp_path / "out" / "kl_coef=0.0").exists()


def test_two_point_sweep_end_to_end(tmp_path, tmp_path_factory):
    config, out = f"{REPO / 'configs/ablations/kl_coef.py'}:runlocal", tmp_path / "kl"
    cache = compilation_cache(tmp_path_factory)
    point0, point1 = out / "kl_coef=0.0" / "seed0", out / "kl_coef=0.001" / "seed0"

    result = sweep(f"--config={config}", f"--workdir={out}", "--point=1", cache=cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running the shared stages ['sft']" in result.stdout, result.stdout
    assert (point1 / "summary.json").exists() and not point0.exists()
    with open(out / "results.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["kl_coef=0.001"]
    metrics1 = (point1 / "metrics.jsonl").read_text()
    mtime1 = (point1 / "metrics.jsonl").stat().st_mtime_ns

    result = sweep(f"--config={config}", f"--workdir={out}", "--point=0,1", "--seeds=0", cache=cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "point 1 kl_coef=0.001 seed 0: skip" in result.stdout, result.stdout
    assert "point 0 kl_coef=0.0 seed 0: running in" in result.stdout, result.stdout
    assert "starts after the shared stages ['sft']" in result.stdout, result.stdout
    assert "running the shared stages" not in result.stdout, result.stdout  # once per seed
    assert (point1 / "metrics.jsonl").read_text() == metrics1
    assert (point1 / "metrics.jsonl").stat().st_mtime_ns == mtime1
    assert (point0 / "summary.json").exists()

    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    for column in (
        "point",
        "name",
        "seed",
        "grpo.algo.kl_coef",
        "start_eval_accuracy",
        "final_eval_accuracy",
        "best_eval_accuracy",
        "reward_last10pct",
        "kl_mean",
        "completion_len_mean",
        "zero_variance_frac",
        "refill_rounds",
        "step_time_s",
        "wall_time_s",
    ):
        assert column in reader.fieldnames, reader.fieldnames
    assert [(r["point"], r["seed"], float(r["grpo.algo.kl_coef"])) for r in rows] == [
        ("0", "0", 0.0),
        ("1", "0", 0.001),
    ]
    for row in rows:
        assert 0.0 <= float(row["final_eval_accuracy"]) <= 1.0
        assert 0.0 <= float(row["start_eval_accuracy"]) <= 1.0  # the shared SFT's final eval
        assert float(row["completion_len_mean"]) > 0 and float(row["wall_time_s"]) > 0
        float(row["reward_last10pct"]), float(row["kl_mean"])
    assert (out / "results.png").stat().st_size > 0
    table = (out / "results.md").read_text().splitlines()
    header = "| point | seeds | start_eval_accuracy | final_eval_accuracy | gain | vs_kl_coef=0.0 |"
    assert table[0].startswith(header) and len(table) == 4, table
    assert table[2].startswith("| kl_coef=0.0 | 0 |") and table[3].startswith("| kl_coef=0.001 | 0 |")

    scratch = tmp_path / "scratch"
    result = sweep(f"--config={config}", f"--workdir={scratch}", "--point=1", "--noshare_stages", cache=cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (scratch / "_shared").exists()
    assert _metric_values(point1) == _metric_values(scratch / "kl_coef=0.001" / "seed0")


def _metric_values(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what differs between equal runs: timings and the process's compile count."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if "time" not in k and k != "compiles"} for x in lines]


def test_shared_stages_are_the_untouched_leading_ones():
    module = _sweep_module()
    config, points = module.load_sweep(str(REPO / "configs/ablations/loss_variants.py"))
    assert module.shared_stages(config, points) == ["sft"]
    assert module.shared_stages(config, points + [{"sft.learning_rate": 1e-3}]) == []
    assert module.shared_stages(config, points + [{"model.num_layers": 2}]) == []
    assert module.shared_stages(config, points + [{"seed": 3}]) == []
    config.stages = ("sft", "grpo", "grpo_final")
    config.grpo_final = config.grpo
    assert module.shared_stages(config, [{"grpo_final.steps": 2}]) == ["sft", "grpo"]
    assert module.shared_stages(config, [{"_name": "same"}, {"_name": "again"}]) == ["sft", "grpo"]


def test_lora_keys_touch_only_the_stages_on_adapters():
    """configs/lora.py's sweep (full GRPO vs ranks) shares the cold-start SFT: `lora.rank` is read only
    by the stages with `lora=True` (grpo here), and a point that turns LoRA on for sft shares nothing."""
    module = _sweep_module()
    config, points = module.load_sweep(str(REPO / "configs/lora.py"))
    assert [p["_name"] for p in points] == ["full", "rank1", "rank8", "rank32"]
    assert module.shared_stages(config, points) == ["sft"]
    assert module.shared_stages(config, points + [{"sft.lora": True}]) == []
    config.grpo.lora = False  # no stage on adapters in the config: `lora.rank` alone touches none
    assert module.shared_stages(config, [{"lora.rank": 4}, {"lora.rank": 8}]) == ["sft"]
    # The train state's bytes (summary.json) are a column, in MiB in results.md.
    row = {"name": "rank8", "seed": 0, **dict.fromkeys(module.COLUMNS), "train_state_bytes": 3 * 2**20}
    header, _, line = module.results_table([row]).splitlines()
    assert "train_state_MiB" in header and "| 3.00 |" in line


def test_results_table_pairs_each_seed_with_point_zero():
    module = _sweep_module()
    row = lambda name, seed, start, final: {
        "name": name,
        "seed": seed,
        **dict.fromkeys(module.COLUMNS),
        "start_eval_accuracy": start,
        "final_eval_accuracy": final,
    }
    rows = [row("a", 0, 0.5, 0.6), row("a", 1, 0.2, 0.3), row("b", 0, 0.5, 0.7), row("b", 1, 0.2, 0.5)]
    lines = module.results_table(rows).splitlines()
    assert lines[0].startswith("| point | seeds | start_eval_accuracy | final_eval_accuracy | gain | vs_a |")
    # b: finals 70, 50 (mean 60.0, std 14.1); gains 20, 30; paired differences to a: +10, +20.
    assert lines[3].startswith("| b | 0,1 | 35.0 ± 21.2 | 60.0 ± 14.1 | 25.0 ± 7.1 | 15.0 ± 7.1 | — |"), (
        lines[3]
    )
    assert lines[2].startswith("| a | 0,1 | 35.0 ± 21.2 | 45.0 ± 21.2 | 10.0 ± 0.0 | 0.0 ± 0.0 |"), lines[2]
