"""scripts/benchmark_rss.py reads the run it watches correctly: the newest GRPO step from a metrics.jsonl
that is still being written (a half-written last line is left for the next read), and the growth figure
it reports against the goal."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_rss.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_rss_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_last_grpo_step_reads_whole_lines_incrementally(bench, tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert bench.last_grpo_step(str(path), 0) == (None, 0)
    lines = [
        {"step": 3, "stage": "sft", "loss": 1.0},
        {"step": 4, "stage": "grpo", "loss": 0.5},
        {"step": 4, "stage": "eval", "eval/accuracy": 0.5},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    path.write_text(text + '{"step": 5, "stage": "gr')  # the trainer is mid-write
    step, offset = bench.last_grpo_step(str(path), 0)
    assert (step, offset) == (4, len(text))
    with open(path, "a") as f:
        f.write('po", "loss": 0.1}\n')
    assert bench.last_grpo_step(str(path), offset) == (5, os.path.getsize(path))


def test_growth_is_measured_after_warmup(bench):
    points = ((50, 900.0), (100, 1000.0), (150, 1020.0), (200, 1030.0))
    samples = [dict(grpo_step=s, rss_mib=r) for s, r in points]
    assert bench.growth(samples, warmup_steps=100) == pytest.approx(0.03)
    assert bench.growth(samples, warmup_steps=50) == pytest.approx(1030.0 / 900.0 - 1.0)
    assert bench.growth(samples, warmup_steps=200) is None


def test_rss_of_this_process_and_of_a_finished_one(bench):
    assert bench.rss_mib(os.getpid()) > 1.0
    assert bench.rss_mib(2**22 + 12345) is None
