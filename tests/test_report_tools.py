"""benchmarks/report_tools.py reads a tool-use sweep's runs (fabricated here, no training): accuracy with vs
without the tool per seed against the +30-point goal, calls per trajectory and error rate per window, and
the step time split."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "report_tools.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report_tools_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run(
    folder: pathlib.Path, sft: float, grpo: float, calls: float = 0.0, errors: float = 0.0, old: int = 0
):
    """A finished run; its first `old` GRPO steps log tool calls without `turns/num_trajectories` (logging
    from before that key: left out of the rates and the time split)."""
    folder.mkdir(parents=True)
    stages = {
        "sft": {"final_eval_accuracy": sft},
        "grpo": {"final_eval_accuracy": grpo, "evals": [{"step": 450, "eval/accuracy": grpo}]},
    }
    (folder / "summary.json").write_text(json.dumps({"stages": stages}))
    (folder / "config.json").write_text(json.dumps({"sft": {"steps": 1000}, "grpo": {"steps": 225}}))
    lines = [{"step": 1, "stage": "sft", "loss": 1.0}]
    for step in range(30):
        m = {
            "step": 400 + step,
            "stage": "grpo",
            "reward/mean": 0.5,
            "sample_time_s": 2.0,
            "step_time_s": 3.0,
        }
        if calls:
            m.update(
                {
                    "tool/num_calls": calls,
                    "tool/num_errors": errors,
                    "tool/errors/malformed": errors,
                    "turns/num_trajectories": 128.0,
                    "turns/respond_time_s": 0.5,
                }
            )
        if step < old:
            m["turns/respond_time_s"] = 99.0
            m.pop("turns/num_trajectories")
        lines.append(m)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_report_states_the_goal_rates_and_time_split(tmp_path, report):
    for seed, (tool, base) in enumerate([(0.80, 0.02), (0.70, 0.04)]):
        _run(tmp_path / "tool" / f"seed{seed}", 0.5, tool, calls=128.0, errors=32.0, old=3 * seed)
        _run(tmp_path / "no_tool" / f"seed{seed}", 0.01, base)
    text = report.render(str(tmp_path), "CMD")
    assert "| 0 | 50.0% → 80.0% | 1.0% → 2.0% | +78.0 |" in text and "SFT (1000 steps)" in text
    assert "goal" in text.lower() and "met (+72.0 points, mean of 2 seed(s))" in text
    assert "| 1–25 | 1.000 | 25.0 % | 0.500 |" in text and "| 26–30 |" in text
    assert "Errors by kind over every seed's training: malformed 1920." in text
    assert "| tool | 1.500 | 0.500 | 1.000 | 3.000 |" in text
    assert "| no_tool | 2.000 | 0.000 | 1.000 | 3.000 |" in text
    _run(tmp_path / "tool" / "seed2", 0.5, 0.05, calls=128.0)
    _run(tmp_path / "no_tool" / "seed2", 0.01, 0.90)  # the mean gap drops to +19.7
    assert "NOT met" in report.render(str(tmp_path), "CMD")
