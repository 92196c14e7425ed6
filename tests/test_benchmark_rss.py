"""benchmarks/benchmark_rss.py reads the run it watches correctly: the newest GRPO step from a metrics.jsonl
that is still being written (a half-written last line is left for the next read), and the growth figure
it reports against the goal."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_rss.py"


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


def test_growth_compares_medians_of_the_first_and_last_samples_after_warmup(bench):
    rss = [900.0, 1000.0, 1300.0, 1010.0, 990.0, 1200.0, 1050.0, 1030.0, 1040.0, 1060.0]
    samples = [dict(grpo_step=50 * (i + 1), rss_mib=r) for i, r in enumerate(rss)]
    # after step 100: first four 1000, 1300, 1010, 990 (median 1005); last four 1050..1060 (median 1045)
    assert bench.growth(samples, warmup_steps=100) == pytest.approx(1045.0 / 1005.0 - 1.0)
    assert bench.growth(samples, warmup_steps=100, window=1) == pytest.approx(1060.0 / 1000.0 - 1.0)
    assert bench.growth(samples, warmup_steps=400) is None  # fewer than two windows of samples


def test_rss_of_this_process_and_of_a_finished_one(bench):
    assert bench.rss_mib(os.getpid()) > 1.0
    assert bench.rss_mib(2**22 + 12345) is None
