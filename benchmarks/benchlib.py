"""Shared pieces of the benchmark scripts in this folder (benchmark.py, benchmark_decode.py, profile_step.py,
peer_trl.py): the benchmark settings and presets, timing that separates compile from run and records the
CPU share the process got, and the machine's measured peaks. The analytic FLOP and byte counts they
compare against are the library's (`grpo_jax.flops`), shared with scripts/aot_compile.py.

Rates and ratios use the minimum over the repeats: on a shared machine other processes only ever add
time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models import ModelConfig

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark setting.

    batch_size B prompts of prompt_len P tokens, num_samples G completions each of max_new_tokens L; the
    GRPO step trains on the B*G rollouts in num_minibatches minibatches (μ = 1). repeats / step_repeats:
    timed calls after the warm-up. matmul_size: side of the square matmul timed for the peak rate;
    copy_mib: size of the array copied to measure memory bandwidth.
    """

    model: ModelConfig
    batch_size: int
    num_samples: int
    prompt_len: int
    max_new_tokens: int
    repeats: int = 5
    step_repeats: int = 3
    matmul_size: int = 2048
    copy_mib: int = 256
    logprob_chunk_size: int = 32
    num_minibatches: int = 1
    kl_coef: float = 0.04

    @property
    def num_rows(self) -> int:
        return self.batch_size * self.num_samples

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["model"] = self.model.to_dict()
        d["model_num_params"] = self.model.num_params()
        return d


PRESETS: dict[str, Callable[[], BenchConfig]] = {
    # ~18.9M params (12.6M of them in matmuls read every decode step); a 2-core CPU runs it in minutes.
    "cpu": lambda: BenchConfig(
        model=ModelConfig(
            vocab_size=16384,
            hidden_size=384,
            intermediate_size=1024,
            num_layers=4,
            num_heads=6,
            num_kv_heads=2,
        ),
        batch_size=8,
        num_samples=8,
        prompt_len=64,
        max_new_tokens=64,
    ),
    # ~1.1B params in bfloat16, a Llama-3.2-1B-like shape; full remat and 8 minibatches keep the step in
    # one 80 GB GPU.
    "gpu": lambda: BenchConfig(
        model=ModelConfig(
            vocab_size=32768,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            param_dtype="bfloat16",
            dtype="bfloat16",
            remat="full",
        ),
        batch_size=16,
        num_samples=16,
        prompt_len=256,
        max_new_tokens=256,
        repeats=5,
        step_repeats=5,
        matmul_size=8192,
        copy_mib=2048,
        logprob_chunk_size=128,
        num_minibatches=8,
    ),
    # Seconds on any machine: the smoke test's setting.
    "tiny": lambda: BenchConfig(
        model=ModelConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
        ),
        batch_size=2,
        num_samples=4,
        prompt_len=8,
        max_new_tokens=8,
        repeats=2,
        step_repeats=2,
        matmul_size=128,
        copy_mib=1,
        logprob_chunk_size=4,
    ),
}


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def compile_timed(jitted, *args, **static_kwargs):
    """Lower and compile `jitted` for these arguments: -> (compiled, seconds). Call `compiled` with the
    dynamic (non-static) arguments only."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **static_kwargs).compile()
    return compiled, time.perf_counter() - start


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall time of `call()` (blocked until ready) over `repeats` calls after `warmup` untimed ones.

    `cpu_share`: CPU seconds this process used per wall second and core while timing. On a CPU backend,
    a share well below the ~1 of an idle machine means other processes held the cores.
    """
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return {
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "cpu_share": (time.process_time() - cpu_start) / sum(times) / os.cpu_count(),
    }


def ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 (a measurement that did not happen)."""
    return a / b if b else None


# ----------------------------------------------------------------------------------------------
# Machine peaks
# ----------------------------------------------------------------------------------------------


def measure_peak_matmul(size: int, dtype: str, repeats: int) -> dict[str, Any]:
    """Best matmul rate of this device: a jitted [size, size] @ [size, size] in `dtype`, in GFLOP/s."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
    compiled, compile_s = compile_timed(jax.jit(jnp.matmul), a, b)
    timing = time_calls(lambda: compiled(a, b), repeats)
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": dtype,
        "compile_s": compile_s,
        **timing,
        "gflops": flops / timing["min_s"] / 1e9,
    }


def measure_copy_bandwidth(mib: int, repeats: int) -> dict[str, Any]:
    """Sustained memory bandwidth: a jitted x * 2 over `mib` MiB of float32 (reads and writes it once)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    compiled, _ = compile_timed(jax.jit(lambda x: x * 2.0), x)
    timing = time_calls(lambda: compiled(x), repeats)
    bytes_moved = 2.0 * x.size * 4
    return {"mib": mib, **timing, "gbps": bytes_moved / timing["min_s"] / 1e9}


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def environment(command: str) -> dict[str, Any]:
    """What every report starts with: the command, time, JAX version, backend, device and load."""
    device = jax.devices()[0]
    return {
        "command": command,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
    }


def prompts(cfg: BenchConfig, seed: int = 0):
    """B random prompts of P tokens (ids >= 2), no padding: (tokens [B, P] int32, mask [B, P])."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.model.vocab_size, (cfg.batch_size, cfg.prompt_len), dtype=np.int32)
    return jnp.asarray(tokens), jnp.ones((cfg.batch_size, cfg.prompt_len), jnp.int32)


def finish(report: dict[str, Any], wall_start: float, cpu_start: float) -> dict[str, Any]:
    """Close a report: the end load average, total wall time and the CPU share the process got (well
    below 1 on a CPU means neighbours, or idle waits, took the cores and every time is inflated)."""
    report["load_average_end"] = list(os.getloadavg())
    report["total_wall_s"] = time.perf_counter() - wall_start
    report["process_cpu_share"] = (time.process_time() - cpu_start) / report["total_wall_s"] / os.cpu_count()
    return report


def write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
