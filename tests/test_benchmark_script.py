"""benchmarks/benchmark.py and benchmarks/benchmark_decode.py have a pulse: the tiny preset runs end to
end and each report has every key the README's tables read. No timing is asserted (the machine is shared); the
analytic costs are exact. Both scripts use only public names of grpo_jax."""

import importlib.util
import json
import pathlib
import re
import sys

import jax
import pytest

from grpo_jax.models import ModelConfig

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if str(SCRIPTS) not in sys.path:  # the scripts import their shared `benchlib` as a sibling
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    module = _load("benchmark")
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def decode():
    module = _load("benchmark_decode")
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def report(benchmark):
    cfg = benchmark.PRESETS["tiny"]()
    return benchmark.run_benchmarks(cfg, ("sampler", "step"), command="test")


def test_report_has_the_expected_keys_and_serialises(report, benchmark):
    for key in (
        "command",
        "jax_version",
        "backend",
        "device_kind",
        "cpu_count",
        "config",
        "peak_matmul",
        "copy_bandwidth",
        "peak_matmul_end",
        "sampler",
        "grpo_step",
        "load_average_start",
        "load_average_end",
        "process_cpu_share",
    ):
        assert key in report, key
    assert report["jax_version"] == jax.__version__
    sampler = report["sampler"]
    assert set(sampler) == {"generate", "prefill", "decode_step"}
    for key in ("generated_tokens_per_s", "compile_s", "median_s", "mean_s", "num_decode_steps"):
        assert key in sampler["generate"], key
    for key in ("shared_over_naive", "shared_without_fan_out_over_naive", "ideal_ratio"):
        assert key in sampler["prefill"], key
    for key in (
        "flops_full_cache",
        "matmul_bound_s",
        "in_loop_s",
        "in_loop_over_matmul_bound",
        "isolated_forward",
        "weight_matmuls_only",
        "sampling_ops",
        "memory_bound_s",
    ):
        assert key in sampler["decode_step"], key
    assert "decode_variants" not in report  # moved to benchmark_decode.py
    step = report["grpo_step"]
    for name in ("chunked", "one_chunk"):
        assert "temp_size_in_bytes" in step[name]["memory"]
        assert "temp_plus_argument_plus_output_bytes" in step[name]["memory"]
    assert step["uses_chunked_logprobs"] is True
    assert "mean_s" in step["step_time"]
    json.loads(json.dumps(report))
    assert "generated tokens/s" in benchmark.format_table(report)


def test_no_early_stop_so_every_budget_token_is_generated(report):
    generate = report["sampler"]["generate"]
    cfg = report["config"]
    assert generate["num_decode_steps"] == cfg["max_new_tokens"]
    assert generate["generated_tokens"] == generate["budget_tokens"] == 2 * 4 * 8
    assert report["sampler"]["prefill"]["ideal_ratio"] == 0.25
    assert report["grpo_step"]["chunked"]["num_chunks"] == 4  # 15 scored tokens in chunks of 4
    assert report["grpo_step"]["one_chunk"]["num_chunks"] == 1


def test_decode_costs_are_exact(benchmark):
    model = ModelConfig(
        vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1
    )
    # per layer: q 4*2*2 + k 4*1*2 + v 4*1*2 + o 2*2*4 = 48, mlp 3*4*6 = 72 -> 2 * 120 + head 40 = 280
    assert benchmark.matmul_param_count(model) == 280
    costs = benchmark.decode_step_costs(model, rows=3, cache_len=8, filled_len=5)
    assert costs["weight_flops"] == 2 * 280 * 3
    assert costs["attention_flops_full_cache"] == 4 * 2 * 2 * 2 * 3 * 8  # 4·H·Dh·layers·rows·keys
    assert costs["kv_bytes_filled"] == 2 * 2 * 3 * 1 * 2 * 4 * 5  # k+v · layers · rows · K · Dh · 4 B · keys
    assert costs["min_bytes"] == 280 * 4 + costs["kv_bytes_filled"]


def test_variants_moved_to_benchmark_decode(benchmark):
    with pytest.raises(ValueError, match="benchmark 'variants' moved to benchmarks/benchmark_decode.py"):
        benchmark.run_benchmarks(benchmark.PRESETS["tiny"](), ("sampler", "variants"))


def test_decode_benchmark_reports_every_loop_and_choice(decode):
    report = decode.run(decode.PRESETS["tiny"](), command="test")
    variants = report["decode_variants"]
    assert variants["steps"] == 7 and variants["rows"] == 8 and variants["vocab_size"] == 256
    for choice in ("argmax", "sampled", "categorical"):
        assert variants[f"loop_{choice}"]["per_step_s"] > 0, choice
    for key in ("choice_sampled", "choice_categorical", "choice_sampled_top_p", "choice_categorical_top_p"):
        assert "median_s" in variants[key], key
    assert variants["choice_sampled_top_p"]["top_p"] == 0.9
    for key in (
        "sampled_loop_over_categorical",
        "sampled_choice_over_categorical",
        "choice_in_loop_sampled_s",
    ):
        assert key in variants, key
    json.loads(json.dumps(report))
    assert "decode loop, sampled" in decode.format_table(report)


def test_scripts_use_only_public_names_of_grpo_jax():
    for name in ("benchmark", "benchmark_decode"):
        source = (SCRIPTS / f"{name}.py").read_text()
        private = re.findall(r"\b(?:sampling|models|sharding|training|grpo_jax(?:\.\w+)*)\._\w+", source)
        assert not private, (name, private)


def test_rollout_engine_benchmark_runs_and_its_systems_agree(capsys):
    """benchmarks/rollout_engine.py at a tiny size: the JSON line has every system's tokens/s and cache
    bytes, and the engine's useful tokens (and tokens) equal the static sampler's."""
    module = _load("rollout_engine")
    try:
        tiny = (
            "--prompts=2 --G=2 --prompt_len=8 --max_new_tokens=12 --mean_len=4 --static_rows=2 --page_size=4"
        )
        model = "--hidden_size=16 --num_layers=1 --num_heads=2 --num_kv_heads=1 --intermediate_size=32"
        report = module.main([*tiny.split(), *model.split(), "--vocab_size=32", "--repeats=1", "--no_write"])
    finally:
        del sys.modules[module.__name__]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["workload"] == "long_tailed"
    systems = ("static", "engine_all_slots", "engine_equal_memory")
    for name in systems:
        for key in ("useful_tokens_per_s", "kv_cache_bytes", "speedup_vs_static", "useful_tokens"):
            assert key in line[name], (name, key)
        assert line[name]["useful_tokens"] == line["static"]["useful_tokens"] > 0
    assert (line["engine_all_slots"]["slots"], line["engine_equal_memory"]["slots"]) == (
        4,
        1,
    )  # pools of 21 and 9 pages of 4 (a slot: 4); static 2 x 20 positions
    assert line["engine_equal_memory"]["kv_cache_bytes"] <= line["static"]["kv_cache_bytes"]
    assert all(report["systems"][name]["tokens_equal_static"] for name in systems)
    assert report["workload"]["stop_ids"] == tuple(range(1, 9))  # p = 8/32 = 1/mean_len
    assert "| static |" in module.render({"long_tailed": report})


def test_rollout_engine_benchmark_takes_a_preset_shape_and_a_dtype():
    """`--preset` fills the long-tailed model's shape (flags still win) and its other settings (q/k/v
    biases, RoPE theta), untied; `--dtype` sets its weights and activations; a preset on the uniform
    workload (its model is bench_trl_d's) is refused."""
    import types

    module = _load("rollout_engine")
    try:
        preset = module.MODEL_PRESETS["qwen2.5-0.5b"]
        extras = module.preset_extras("qwen2.5-0.5b")
        assert extras["qkv_bias"] is True and extras["rope_theta"] == preset["rope_theta"]
        assert not set(extras) & {*module.SHAPE_FLAGS, "tie_embeddings"} and module.preset_extras("") == {}
        args = types.SimpleNamespace(
            workload="long_tailed", preset="qwen2.5-0.5b", dtype="bfloat16", prompts=1, num_samples=2,
            prompt_len=4, max_new_tokens=8, mean_len=0, seed=0, hidden_size=16, num_layers=1, num_heads=2,
            num_kv_heads=1, intermediate_size=32, vocab_size=64,
        )  # fmt: skip
        w = module.build(args)
        assert w["model"].qkv_bias and not w["model"].tie_embeddings and w["model"].dtype == "bfloat16"
        assert w["params"]["lm_head"].dtype == jax.numpy.bfloat16
        with pytest.raises(SystemExit):
            module.main(["--workload=uniform", "--preset=qwen2.5-0.5b", "--no_write"])
    finally:
        del sys.modules[module.__name__]
