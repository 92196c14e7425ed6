"""scripts/aot_compile.py: compile the sampler and the GRPO step for a TPU topology on this CPU (libtpu's
compile-only devices) and report memory per device in one JSON line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "aot_compile.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"),
    reason='libtpu is not installed (pip install -e ".[tpu]")',
)

# The quickstart's smoke-test model on a 2x2 v5e slice; 4 prompts so the 4-way data axis divides them.
SMALL = [
    "--config=configs/quickstart.py:runlocal",
    "--topology=v5e:2x2",
    "--config.grpo.prompts_per_step=4",
]


def aot(*args):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def test_small_config_fits_on_v5e_2x2():
    report, printed = aot(*SMALL)
    assert report["topology"] == "v5e:2x2"
    assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["hbm_bytes_per_device"] == 16 * 2**30
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["batch"]["rows"] == 4 * 4  # prompts x G
    assert set(report["programs"]) == {"sampler", "grpo_step"}
    for name, program in report["programs"].items():
        assert program["fits"] is True, name
        assert program["peak_bytes_per_device"] > 0, name
        assert program["peak_bytes_per_device"] >= program["memory"]["argument_bytes"], name
        assert program["xla_flops"] > 0 and program["analytic_flops"] > 0, name
    # The step does more work than sampling the same rollout once (policy fwd+bwd and reference).
    assert report["programs"]["grpo_step"]["analytic_flops"] > report["programs"]["sampler"]["analytic_flops"]
    assert any("sampler: fits" in line for line in printed)


def test_a_model_too_large_for_the_slice_does_not_fit():
    # Qwen2.5-7B replicated on 4 devices (fp32 weights, reference and Adam moments: ~120 GiB each).
    report, printed = aot(*SMALL, "--model_preset=qwen2.5-7b", "--programs=grpo_step")
    (step,) = report["programs"].values()
    assert step["fits"] is False
    assert step["peak_bytes_per_device"] > report["hbm_bytes_per_device"]
    assert "RESOURCE_EXHAUSTED" in step["oom"]
    assert any("DOES NOT FIT" in line for line in printed)


@pytest.mark.parametrize("sampler_weights", ["merged", "adapters"])
def test_a_lora_stage_compiles_with_adapter_state_and_no_reference_copy(sampler_weights):
    """config.grpo.lora: the step's state is the adapters, their moments and the bfloat16 base (no fp32
    policy, moments or reference), far below the full-parameter state; both sampler switches compile."""
    lora = (
        "--config=configs/lora.py:runlocal",
        *SMALL[1:],
        "--config.lora.base_dtype=bfloat16",
        "--config.lora.rank=2",  # the smoke model is so small that rank-8 adapters are a third of it
        f"--config.lora.sampler_weights={sampler_weights}",
    )
    report, printed = aot(*lora)
    assert report["lora"]["rank"] == 2 and report["lora"]["sampler_weights"] == sampler_weights
    assert all(p["fits"] for p in report["programs"].values())
    assert any("on rank-2 LoRA adapters" in line for line in printed)
    full, _ = aot(*lora, "--config.grpo.lora=False", "--programs=grpo_step")
    assert full["lora"] is None
    # full: fp32 params + two moments + a reference ≈ 16 B/param; LoRA: a bf16 base ≈ 2 B/param + adapters.
    assert report["state_bytes_per_device"] < full["state_bytes_per_device"] / 4


def test_bad_topology_fails_with_one_line():
    result = subprocess.run(
        [sys.executable, SCRIPT, "--config=configs/quickstart.py:runlocal", "--topology=v5e-16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e-16:")


def test_splash_attention_and_offloaded_remat_compile_for_a_tpu():
    """The real Pallas splash kernel (Mosaic, no interpret mode) and a remat policy that offloads q, k, v
    to pinned host memory lower and compile for a v5e slice (head_dim 128, as the kernel's lanes want)."""
    report, _ = aot(
        *SMALL,
        "--config.model.hidden_size=512",
        "--config.model.intermediate_size=512",
        "--config.model.attention_impl=splash",
        "--config.model.remat=offload_qkv_proj",
        "--programs=grpo_step",
    )
    assert report["model"]["attention_impl"] == "splash" and report["model"]["remat"] == "offload_qkv_proj"
    assert report["programs"]["grpo_step"]["fits"] is True


def test_the_engine_on_the_pallas_paged_kernel_compiles_for_a_tpu():
    """attention_impl="splash": the rollout engine decodes with the Pallas paged-attention kernel (Mosaic,
    no interpret mode; a `tpu_custom_call` in the program) inside its per-data-shard vmap, the kernel under
    shard_map with its KV heads over tensor = 2; its memory and one decode step's bytes are reported."""
    report, printed = aot(
        *SMALL,
        "--config.model.hidden_size=512",
        "--config.model.intermediate_size=512",
        "--config.model.attention_impl=splash",
        "--config.model.dtype=bfloat16",
        "--config.mesh=(2,1,2)",
        "--programs=engine,engine_step",
    )
    assert report["engine"]["attention"] == "pallas" and report["engine"]["shards"] == 2
    for name in ("engine", "engine_step"):
        program = report["programs"][name]
        assert program["fits"] is True and program["peak_bytes_per_device"] > 0, name
        assert "tpu_custom_call" in program["custom_calls"], name
        assert program["xla_bytes_accessed"] > 0, name
    assert any("engine_step: fits" in line for line in printed)


def test_a_sampler_mesh_compiles_the_sampler_on_its_own_slice_with_bf16_weights():
    """--config.sampler_mesh with --sampler_topology: the step on the trainer's slice (v5e:2x2, mesh
    4 × 1 × 1), the sampler on its own (v5e:2x2 as 2 replicas × 2 tensor) with the weights in the compute
    dtype, and the weight sync's bytes per chip: each sampler chip receives its tensor slice, each trainer
    chip casts the copy it holds (replicated on a data-parallel mesh). Without the topology, one line."""
    split = (
        *SMALL,
        "--config.model.dtype=bfloat16",
        "--config.sampler_mesh=(2,2)",
        "--sampler_topology=v5e:2x2",
    )
    report, printed = aot(*split, "--programs=sampler,grpo_step")
    assert report["sampler_mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert report["programs"]["sampler"]["mesh"] == report["sampler_mesh"]
    assert report["programs"]["grpo_step"]["mesh"] == report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert all(p["fits"] for p in report["programs"].values())
    sync = report["weight_sync"]
    assert sync["dtype"] == "bfloat16" and sync["mirror_copies"] == 1
    assert sync["received_bytes_per_sampler_chip"] < sync["total_bytes"]  # a tensor slice, not the whole
    assert sync["cast_shard_bytes_per_trainer_chip"] == sync["total_bytes"]  # data-parallel: replicated
    # the sampler's arguments are the bf16 weights: half the fp32 ones the co-located sampler takes
    colocated, _ = aot(*SMALL, "--config.model.dtype=bfloat16", "--programs=sampler")
    weights = lambda r: r["programs"]["sampler"]["unpadded_input_bytes_per_device"]
    assert weights(report) < weights(colocated)
    assert any(line.startswith("split: trainer mesh") for line in printed)
    result = subprocess.run(
        [sys.executable, SCRIPT, *SMALL, "--config.sampler_mesh=(2,2)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        "--sampler_topology and --config.sampler_mesh go together" in result.stderr.strip().splitlines()[-1]
    )
