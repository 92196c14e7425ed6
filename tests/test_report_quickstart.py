"""benchmarks/report_quickstart.py judges the quickstart's promise (every seed gains >= +25 points, the
median >= +30, every run <= 300 s) from per-seed results; no training runs here."""

import importlib.util
import os
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "report_quickstart.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report_quickstart_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _result(seed, sft, grpo, wall=200.0, load=(1.0, 1.5)):
    return {
        "seed": seed,
        "sft_accuracy": sft,
        "grpo_accuracy": grpo,
        "grpo_evals": [(100, grpo)],
        "reward_first10": 0.5,
        "reward_last10": 0.9,
        "kl_max": 0.1,
        "kl_last": 0.05,
        "wall_time_s": wall,
        "load_average_start": load[0],
        "load_average_end": load[1],
        "cpu_share": 0.9,
    }


def test_goal_met_needs_every_seed_the_median_and_the_wall_time(report):
    good = [_result(s, 0.40, 0.40 + g / 100) for s, g in enumerate((26, 31, 33, 35, 40))]
    summary = report.goal_summary(good)
    assert summary["median_gain"] == pytest.approx(33.0)
    assert summary["min_gain"] == pytest.approx(26.0)
    assert summary["goal_met"]

    one_weak = [*good[:4], _result(4, 0.40, 0.60)]  # +20 on one seed, the median stays >= +30
    summary = report.goal_summary(one_weak)
    assert summary["met"] == {"min_gain": False, "median_gain": True, "max_wall_s": True}
    assert not summary["goal_met"]

    low_median = [_result(s, 0.40, 0.40 + g / 100) for s, g in enumerate((26, 27, 28, 35, 40))]
    assert report.goal_summary(low_median)["met"]["median_gain"] is False

    slow = [*good[:4], _result(4, 0.40, 0.80, wall=301.0)]
    assert report.goal_summary(slow)["met"] == {"min_gain": True, "median_gain": True, "max_wall_s": False}


def test_render_states_the_verdict_and_a_loaded_machine(report):
    meta = {"machine": "x86_64, 2 cores", "jax": "0"}
    busy = 4.5 * os.cpu_count()  # a 1-minute load average well above the core count
    results = [_result(s, 0.40, 0.75, load=(busy, 1.0)) for s in range(5)]
    text = report.render(results, report.goal_summary(results), meta, root="/tmp/r", config="c.py")
    assert "--seeds=0,1,2,3,4 --root=/tmp/r" in text
    assert "**Goal met.**" in text and "Median gain: +35.0" in text
    assert f"load average reached {busy:.1f}" in text
    results[2]["grpo_accuracy"] = 0.45
    assert "**Goal NOT met.**" in report.render(
        results, report.goal_summary(results), meta, root="/tmp/r", config="c.py"
    )
