"""Benchmark the sampler and the GRPO step; print a table and write one JSON per run.

    python scripts/benchmark.py --preset=cpu --out=benchmarks/cpu.json
    python scripts/benchmark.py --preset=gpu --which=sampler --out=benchmarks/h100_sampler.json

Every timing runs after a warm-up call; compile time (lower + compile) is reported separately. Timed
quantities record mean / median / min over the repeats and the CPU share the process got; derived
rates and ratios use the min: on a shared machine other processes only ever add time.
What is measured and why (numbers in benchmarks/README.md):

sampler   generated tokens/s of `sampling.generate` (B prompts x G samples x L tokens, no early stop:
          `eos_id` = vocab_size, a token that is never sampled); the shared-prefix prefill (B prompts,
          then the KV cache fanned out G times) against the naive prefill of B*G prompts; one decode
          step measured in the loop, alone (`forward_with_cache`, cache donated), as its weight matmuls
          only, and the sampling ops alone; FLOPs per decode step against this machine's measured peak
          matmul rate (the matmul bound), and bytes per step against the measured copy bandwidth (the
          memory bound) and, on a GPU, the HBM peak given by --peak_hbm_gbps.
variants  the decode loop (`forward_with_cache` in a fori_loop) with no sampling (argmax), with the
          sampler's token choice, and with a proposed inverse-CDF token choice; the two choices alone.
step      the one-program GRPO step (`make_grpo_step`, μ = 1, β > 0 so the reference forward runs):
          step time and `compiled.memory_analysis()`, with the chunked logprob path at the preset's
          chunk size and with one chunk covering the whole sequence.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.models import ModelConfig, forward_with_cache, init_cache, init_params, positions_from_mask
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    make_grpo_step,
    make_optimizer,
    rollout_to_batch,
)

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


BENCHMARKS = ("sampler", "variants", "step")

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


def _ratio(a: float, b: float) -> float | None:
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
# Analytic costs of one decode step
# ----------------------------------------------------------------------------------------------


def matmul_param_count(model: ModelConfig) -> int:
    """Weights multiplied by every token: attention and MLP projections plus the output head (the
    embedding is a gather, not a matmul, unless it is tied and doubles as the head)."""
    d, f, hd = model.hidden_size, model.intermediate_size, model.resolved_head_dim
    per_layer = d * hd * (2 * model.num_heads + 2 * model.num_kv_heads) + 3 * d * f
    return model.num_layers * per_layer + d * model.vocab_size


def decode_step_costs(model: ModelConfig, rows: int, cache_len: int, filled_len: float) -> dict[str, float]:
    """FLOPs and bytes of one decode step over `rows` sequences.

    Attention FLOPs (QK^T and PV, 4·H·Dh per key) are given over the `cache_len` keys the sampler reads
    each step (it attends to the whole cache, masked) and over the `filled_len` keys that are real.
    Bytes are the least any implementation must read: every matmul weight once, and the K and V of the
    real keys (`kv_bytes_full_cache`: of the whole cache, as the sampler reads it).
    """
    layers, heads, kv_heads, hd = (
        model.num_layers,
        model.num_heads,
        model.num_kv_heads,
        model.resolved_head_dim,
    )
    weight_flops = 2.0 * matmul_param_count(model) * rows
    attn_per_key = 4.0 * heads * hd * layers * rows
    weight_bytes = matmul_param_count(model) * jnp.dtype(model.param_dtype).itemsize
    kv_per_key = 2.0 * layers * rows * kv_heads * hd * jnp.dtype(model.dtype).itemsize
    return {
        "weight_flops": weight_flops,
        "attention_flops_full_cache": attn_per_key * cache_len,
        "attention_flops_filled": attn_per_key * filled_len,
        "flops_full_cache": weight_flops + attn_per_key * cache_len,
        "weight_bytes": float(weight_bytes),
        "kv_bytes_full_cache": kv_per_key * cache_len,
        "kv_bytes_filled": kv_per_key * filled_len,
        "min_bytes": weight_bytes + kv_per_key * filled_len,
    }


# ----------------------------------------------------------------------------------------------
# Jitted pieces of the sampler, timed one at a time
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "total_len", "fan_out"))
def prefill(model, params, tokens, mask, *, total_len, fan_out):
    """What the sampler does before decoding: one cached forward over [B, P] left-padded prompts, then
    the cache repeated `fan_out` times. -> (last-position logits [B*fan_out, V], cache)."""
    batch, prompt_len = tokens.shape
    cache = init_cache(model, batch, total_len)
    key_mask = jnp.pad(mask, ((0, 0), (0, total_len - prompt_len)))
    logits, cache = forward_with_cache(model, params, tokens, positions_from_mask(mask), cache, 0, key_mask)
    if fan_out > 1:
        cache = jax.tree_util.tree_map(lambda c: jnp.repeat(c, fan_out, axis=1), cache)
    return jnp.repeat(logits[:, -1], fan_out, axis=0), cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model, params, cache, tokens, positions, slot, key_mask):
    """One decode step alone: tokens [N, 1] through `forward_with_cache` at cache slot `slot`."""
    logits, cache = forward_with_cache(model, params, tokens, positions, cache, slot, key_mask)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model",))
def decode_matmuls(model, params, x):
    """Only the weight matmuls of one decode step at its shapes (x [N, D]), chained so none is dead code:
    the fastest a step could be if attention, norms, RoPE and sampling were free."""

    def layer(x, w):
        q = jnp.einsum("nd,dhk->nhk", x, w["q"])
        kv = jnp.einsum("nd,dhk->nhk", x, w["k"]) + jnp.einsum("nd,dhk->nhk", x, w["v"])
        x = x + jnp.einsum("nhk,hkd->nd", q, w["o"]) + jnp.mean(kv, axis=(1, 2))[:, None]
        gated = jnp.einsum("nd,df->nf", x, w["gate"]) * jnp.einsum("nd,df->nf", x, w["up"])
        return x + jnp.einsum("nf,fd->nd", gated, w["down"]), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    head = params["embed"].T if model.tie_embeddings else params["lm_head"]
    return x @ head


@functools.partial(jax.jit, static_argnames=("temperature",))
def sampling_ops(logits, row_keys, step, *, temperature):
    """The per-step token choice of the sampler alone: log-softmax, per-row categorical, logprob."""
    return sampling.choose_tokens(logits, row_keys, step, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# The decode loop, and a proposed token choice timed against the current one (--which=variants)
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("temperature",))
def sampling_ops_inverse_cdf(logits, row_keys, step, *, temperature):
    """Proposed token choice: one uniform per row and a search in the CDF, instead of the V Gumbel
    draws per row of `jax.random.categorical` (same distribution, different random stream).
    -> (token [N], logprob [N])."""
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(row_keys)
    cdf = jnp.cumsum(jnp.exp(logp_all), axis=-1)
    token = jnp.sum(cdf < uniform[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)
    token = jnp.minimum(token, logits.shape[-1] - 1)
    return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]


DECODE_LOOPS = ("argmax", "sampled_current", "sampled_inverse_cdf")


@functools.partial(
    jax.jit, static_argnames=("model", "choose", "prompt_len", "steps"), donate_argnames=("cache",)
)
def decode_loop(model, params, cache, tokens, row_keys, *, choose, prompt_len, steps):
    """`steps` decode steps of `forward_with_cache` in a `lax.fori_loop`, each feeding its chosen token
    to the next: the sampler's loop without its bookkeeping. choose: "argmax" (the forward alone, nothing
    dead) | "sampled_current" (the sampler's `_choose`) | "sampled_inverse_cdf" (the proposal above).
    -> (cache, last tokens [N, 1])."""
    n, total = tokens.shape[0], cache["k"].shape[2]

    def body(i, carry):
        cache, tokens = carry
        slot = prompt_len + i
        key_mask = jnp.broadcast_to(jnp.arange(total) <= slot, (n, total)).astype(jnp.int32)
        positions = jnp.full((n, 1), slot, jnp.int32)
        logits, cache = forward_with_cache(model, params, tokens, positions, cache, slot, key_mask)
        if choose == "argmax":
            token = jnp.argmax(logits[:, 0], axis=-1)
        elif choose == "sampled_current":
            token = sampling_ops(logits[:, 0], row_keys, i, temperature=1.0)[0]
        else:
            token = sampling_ops_inverse_cdf(logits[:, 0], row_keys, i, temperature=1.0)[0]
        return cache, token[:, None].astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens))


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def _prompts(cfg: BenchConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.model.vocab_size, (cfg.batch_size, cfg.prompt_len), dtype=np.int32)
    return jnp.asarray(tokens), jnp.ones((cfg.batch_size, cfg.prompt_len), jnp.int32)


def bench_sampler(
    cfg: BenchConfig, params, peak_matmul_gflops: float, copy_gbps: float, peak_hbm_gbps: float | None
) -> tuple[dict[str, Any], Any]:
    """Sampler throughput, shared vs naive prefill, and one decode step against its bounds.
    -> (results, the last Rollout)."""
    model, n, G = cfg.model, cfg.num_rows, cfg.num_samples
    tokens, mask = _prompts(cfg)
    rng = jax.random.key(1)
    static = dict(
        num_samples=G,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        stop_ids=(model.vocab_size,),
        min_new_tokens=0,
        pad_id=0,
        mesh=None,
    )
    generate, generate_compile_s = compile_timed(
        sampling._generate, model, params, tokens, mask, rng, **static
    )
    last = {}

    def one_generate():
        last["rollout"] = generate(params, tokens, mask, rng)
        return last["rollout"]

    generate_time = time_calls(one_generate, cfg.repeats)
    rollout = last["rollout"]
    num_steps = int(rollout.num_steps)
    generated = int(jnp.sum(rollout.mask))

    # Prefill: shared (B prompts, cache fanned out G times) vs naive (B*G prompts).
    prefills = {}
    naive_tokens, naive_mask = jnp.repeat(tokens, G, axis=0), jnp.repeat(mask, G, axis=0)
    for name, args, fan_out in (
        ("shared", (tokens, mask), G),
        ("shared_without_fan_out", (tokens, mask), 1),
        ("naive", (naive_tokens, naive_mask), 1),
    ):
        fn, compile_s = compile_timed(prefill, model, params, *args, total_len=cfg.total_len, fan_out=fan_out)
        prefills[name] = {
            "compile_s": compile_s,
            **time_calls(lambda fn=fn, args=args: fn(params, *args), cfg.repeats),
        }

    # One decode step, in the loop and in isolation, against what bounds it.
    loop_step_s = (generate_time["min_s"] - prefills["shared"]["min_s"]) / max(num_steps - 1, 1)
    slot = cfg.prompt_len + cfg.max_new_tokens // 2
    cache = init_cache(model, n, cfg.total_len)
    key_mask = (jnp.arange(cfg.total_len) <= slot).astype(jnp.int32)[None].repeat(n, axis=0)
    step_tokens = jnp.full((n, 1), 5, jnp.int32)
    positions = jnp.full((n, 1), slot, jnp.int32)
    slot_arr = jnp.asarray(slot, jnp.int32)
    step_fn, step_compile_s = compile_timed(
        decode_step, model, params, cache, step_tokens, positions, slot_arr, key_mask
    )
    xla_step_flops = (step_fn.cost_analysis() or {}).get("flops")
    holder = {"cache": cache}

    def one_step():
        logits, holder["cache"] = step_fn(params, holder["cache"], step_tokens, positions, slot_arr, key_mask)
        return logits

    isolated = time_calls(one_step, cfg.repeats * 4)
    x = jnp.ones((n, model.hidden_size), model.compute_dtype)
    matmuls_fn, _ = compile_timed(decode_matmuls, model, params, x)
    matmuls_only = time_calls(lambda: matmuls_fn(params, x), cfg.repeats * 4)
    logits = jax.random.normal(jax.random.key(2), (n, model.vocab_size), jnp.float32)
    row_keys = jax.random.split(jax.random.key(3), n)
    choose_fn, _ = compile_timed(sampling_ops, logits, row_keys, jnp.asarray(3), temperature=1.0)
    choose = time_calls(lambda: choose_fn(logits, row_keys, jnp.asarray(3)), cfg.repeats * 4)

    costs = decode_step_costs(model, n, cfg.total_len, cfg.prompt_len + cfg.max_new_tokens / 2)
    matmul_bound_s = costs["flops_full_cache"] / (peak_matmul_gflops * 1e9)
    memory_bound_s = costs["min_bytes"] / (copy_gbps * 1e9)
    results = {
        "generate": {
            "compile_s": generate_compile_s,
            **generate_time,
            "num_decode_steps": num_steps,
            "generated_tokens": generated,
            "budget_tokens": n * cfg.max_new_tokens,
            "generated_tokens_per_s": generated / generate_time["min_s"],
            "decode_tokens_per_s": n / loop_step_s,
        },
        "prefill": {
            **prefills,
            "shared_over_naive": _ratio(prefills["shared"]["min_s"], prefills["naive"]["min_s"]),
            "shared_without_fan_out_over_naive": _ratio(
                prefills["shared_without_fan_out"]["min_s"], prefills["naive"]["min_s"]
            ),
            "ideal_ratio": 1.0 / G,
        },
        "decode_step": {
            "rows": n,
            "cache_len": cfg.total_len,
            **costs,
            "xla_cost_analysis_flops": xla_step_flops,
            "peak_matmul_gflops": peak_matmul_gflops,
            "matmul_bound_s": matmul_bound_s,
            "copy_gbps": copy_gbps,
            "memory_bound_s": memory_bound_s,
            "in_loop_s": loop_step_s,
            "isolated_forward": {"compile_s": step_compile_s, **isolated},
            "weight_matmuls_only": matmuls_only,
            "sampling_ops": choose,
            "in_loop_over_matmul_bound": _ratio(loop_step_s, matmul_bound_s),
            "isolated_over_matmul_bound": _ratio(isolated["min_s"], matmul_bound_s),
            "matmuls_only_over_matmul_bound": _ratio(matmuls_only["min_s"], matmul_bound_s),
            "in_loop_over_memory_bound": _ratio(loop_step_s, memory_bound_s),
            "achieved_gflops_in_loop": costs["flops_full_cache"] / loop_step_s / 1e9,
        },
    }
    if jax.default_backend() == "gpu" and peak_hbm_gbps:
        results["decode_step"]["hbm_roofline"] = {
            "peak_hbm_gbps": peak_hbm_gbps,
            "achieved_gbps_in_loop": costs["min_bytes"] / loop_step_s / 1e9,
            "fraction_in_loop": costs["min_bytes"] / loop_step_s / (peak_hbm_gbps * 1e9),
            "fraction_isolated": costs["min_bytes"] / isolated["min_s"] / (peak_hbm_gbps * 1e9),
        }
    return results, rollout


def _memory_stats(compiled) -> dict[str, Any]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = {name: getattr(stats, name) for name in dir(stats) if name.endswith("_in_bytes")}
    if {"temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"} <= fields.keys():
        fields["temp_plus_argument_plus_output_bytes"] = (
            fields["temp_size_in_bytes"] + fields["argument_size_in_bytes"] + fields["output_size_in_bytes"]
        )
        fields["minus_aliased_bytes"] = fields["temp_plus_argument_plus_output_bytes"] - fields.get(
            "alias_size_in_bytes", 0
        )
    return fields


def bench_grpo_step(cfg: BenchConfig, params, rollout) -> dict[str, Any]:
    """Step time and compiled memory of the GRPO step, chunked logprobs vs one whole-sequence chunk."""
    model = cfg.model
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    grpo = GRPOConfig(
        num_generations=cfg.num_samples,
        kl_coef=cfg.kl_coef,
        num_iterations=1,
        num_minibatches=cfg.num_minibatches,
    )
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6))
    param_sh = sharding.model_param_shardings(mesh, model)
    state, state_sh = create_train_state(
        jax.device_put(params, param_sh),
        optimizer,
        mesh,
        param_sh,
        rng=jax.random.key(0),
        with_reference=cfg.kl_coef > 0,
    )
    batch = rollout_to_batch(
        rollout, {}, cfg.num_samples, host_rewards=jax.random.normal(jax.random.key(4), (cfg.num_rows,))
    )
    full_len = cfg.total_len - 1  # token_logprobs scores T - 1 next tokens
    variants = {}
    compiled_steps = {}
    for name, chunk in (("chunked", cfg.logprob_chunk_size), ("one_chunk", full_len)):
        step = make_grpo_step(
            grpo, model, optimizer, mesh=mesh, state_shardings=state_sh, logprob_chunk_size=chunk
        )
        compiled_steps[name], compile_s = compile_timed(step, state, batch)
        variants[name] = {
            "logprob_chunk_size": min(chunk, full_len),
            "num_chunks": -(-full_len // chunk),
            "compile_s": compile_s,
            "memory": _memory_stats(compiled_steps[name]),
        }
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled_steps["chunked"](holder["state"], batch)
        return metrics

    timing = time_calls(one_step, cfg.step_repeats)
    tokens = cfg.num_rows * cfg.total_len
    flops = 6.0 * matmul_param_count(model) * tokens + (
        2.0 * matmul_param_count(model) * tokens if cfg.kl_coef > 0 else 0.0
    )
    mem = lambda v: variants[v]["memory"].get("temp_plus_argument_plus_output_bytes")
    return {
        "rows": cfg.num_rows,
        "seq_len": cfg.total_len,
        "num_iterations": 1,
        "num_minibatches": cfg.num_minibatches,
        "kl_coef": cfg.kl_coef,
        "uses_chunked_logprobs": True,
        **variants,
        "step_time": timing,
        "weight_flops_per_step": flops,
        "achieved_gflops": flops / timing["min_s"] / 1e9,
        "chunked_over_one_chunk_memory": _ratio(mem("chunked") or 0, mem("one_chunk") or 0),
        "chunked_over_one_chunk_temp": _ratio(
            variants["chunked"]["memory"].get("temp_size_in_bytes", 0),
            variants["one_chunk"]["memory"].get("temp_size_in_bytes", 0),
        ),
    }


def bench_decode_variants(cfg: BenchConfig, params) -> dict[str, Any]:
    """Per-step time of the decode loop with no sampling, with the sampler's token choice and with the
    inverse-CDF proposal (same distribution, another random stream), and the two token choices alone."""
    model, n = cfg.model, cfg.num_rows
    steps = cfg.max_new_tokens - 1
    tokens = jnp.full((n, 1), 5, jnp.int32)
    row_keys = jax.random.split(jax.random.key(3), n)
    results: dict[str, Any] = {"steps": steps}
    for choose in DECODE_LOOPS:
        cache = init_cache(model, n, cfg.total_len)
        static = dict(choose=choose, prompt_len=cfg.prompt_len, steps=steps)
        loop, compile_s = compile_timed(decode_loop, model, params, cache, tokens, row_keys, **static)
        holder = {"cache": cache}

        def run(loop=loop, holder=holder):
            holder["cache"], last = loop(params, holder["cache"], tokens, row_keys)
            return last

        timing = time_calls(run, cfg.repeats)
        results[f"loop_{choose}"] = {"compile_s": compile_s, **timing, "per_step_s": timing["min_s"] / steps}
    per_step = lambda choose: results[f"loop_{choose}"]["per_step_s"]
    results["inverse_cdf_loop_over_current"] = _ratio(
        per_step("sampled_inverse_cdf"), per_step("sampled_current")
    )
    logits = jax.random.normal(jax.random.key(2), (n, model.vocab_size), jnp.float32)
    step = jnp.asarray(3)
    for name, fn in (("sampling_current", sampling_ops), ("sampling_inverse_cdf", sampling_ops_inverse_cdf)):
        compiled, _ = compile_timed(fn, logits, row_keys, step, temperature=1.0)
        results[name] = time_calls(
            lambda compiled=compiled: compiled(logits, row_keys, step), cfg.repeats * 4
        )
    results["inverse_cdf_over_current"] = _ratio(
        results["sampling_inverse_cdf"]["min_s"], results["sampling_current"]["min_s"]
    )
    return results


def run_benchmarks(
    cfg: BenchConfig,
    which: Sequence[str] = BENCHMARKS,
    *,
    peak_hbm_gbps: float | None = 3350.0,
    command: str = "",
) -> dict[str, Any]:
    """Run the selected benchmarks on `cfg`; -> one JSON-able dict (environment, config, results)."""
    unknown = set(which) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "command": command,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "config": cfg.to_dict(),
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    params = init_params(cfg.model, jax.random.key(0))
    report["peak_matmul"] = measure_peak_matmul(cfg.matmul_size, cfg.model.dtype, cfg.repeats)
    report["copy_bandwidth"] = measure_copy_bandwidth(cfg.copy_mib, cfg.repeats)
    rollout = None
    if "sampler" in which:
        report["sampler"], rollout = bench_sampler(
            cfg, params, report["peak_matmul"]["gflops"], report["copy_bandwidth"]["gbps"], peak_hbm_gbps
        )
    if "variants" in which:
        report["decode_variants"] = bench_decode_variants(cfg, params)
    if "step" in which:
        if rollout is None:
            tokens, mask = _prompts(cfg)
            rollout = sampling.generate(
                cfg.model,
                params,
                tokens,
                mask,
                jax.random.key(1),
                num_samples=cfg.num_samples,
                max_new_tokens=cfg.max_new_tokens,
                eos_id=cfg.model.vocab_size,
            )
        report["grpo_step"] = bench_grpo_step(cfg, params, rollout)
    report["peak_matmul_end"] = measure_peak_matmul(cfg.matmul_size, cfg.model.dtype, cfg.repeats)
    report["load_average_end"] = list(os.getloadavg())
    report["total_wall_s"] = time.perf_counter() - start
    # CPU seconds this process got per wall second and core: well below 1 on a CPU means neighbours
    # (or idle waits) took the cores, and every time above is inflated.
    report["process_cpu_share"] = (time.process_time() - cpu_start) / report["total_wall_s"] / os.cpu_count()
    return report


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """The headline numbers as an aligned two-column table."""
    ms = lambda s: f"{s * 1e3:.2f} ms"
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    rows = [
        ("device", f"{report['backend']} / {report['device_kind']} ({report['cpu_count']} cpus)"),
        (
            "load average start/end",
            f"{report['load_average_start'][0]:.2f} / {report['load_average_end'][0]:.2f}",
        ),
        ("model params", f"{report['config']['model_num_params'] / 1e6:.1f} M"),
        (
            "peak matmul start / end",
            f"{report['peak_matmul']['gflops']:.1f} / {report['peak_matmul_end']['gflops']:.1f} GFLOP/s "
            f"({report['peak_matmul']['size']}^3)",
        ),
        ("copy bandwidth", f"{report['copy_bandwidth']['gbps']:.1f} GB/s"),
    ]
    if "sampler" in report:
        gen, pre, dec = (
            report["sampler"]["generate"],
            report["sampler"]["prefill"],
            report["sampler"]["decode_step"],
        )
        rows += [
            ("generate compile", f"{gen['compile_s']:.2f} s"),
            ("generate wall (min)", f"{gen['min_s']:.3f} s for {gen['generated_tokens']} tokens"),
            ("generated tokens/s", f"{gen['generated_tokens_per_s']:.0f}"),
            (
                "prefill shared / naive",
                f"{ms(pre['shared']['min_s'])} / {ms(pre['naive']['min_s'])} "
                f"= {pre['shared_over_naive']:.3f} (ideal {pre['ideal_ratio']:.3f})",
            ),
            ("prefill shared w/o fan-out / naive", f"{pre['shared_without_fan_out_over_naive']:.3f}"),
            ("decode step in loop", f"{ms(dec['in_loop_s'])} (cpu share {gen['cpu_share']:.2f})"),
            ("decode step isolated forward", ms(dec["isolated_forward"]["min_s"])),
            ("decode weight matmuls only", ms(dec["weight_matmuls_only"]["min_s"])),
            ("decode sampling ops only", ms(dec["sampling_ops"]["min_s"])),
            ("decode FLOPs (full cache)", f"{dec['flops_full_cache'] / 1e9:.3f} GFLOP"),
            ("matmul bound", ms(dec["matmul_bound_s"])),
            ("in loop / matmul bound", f"{dec['in_loop_over_matmul_bound']:.2f}x"),
            ("isolated / matmul bound", f"{dec['isolated_over_matmul_bound']:.2f}x"),
            ("matmuls only / matmul bound", f"{dec['matmuls_only_over_matmul_bound']:.2f}x"),
            ("memory bound (min bytes / copy bw)", ms(dec["memory_bound_s"])),
        ]
        if "hbm_roofline" in dec:
            rows.append(("HBM roofline fraction (in loop)", f"{dec['hbm_roofline']['fraction_in_loop']:.3f}"))
    if "decode_variants" in report:
        var = report["decode_variants"]
        rows += [
            (f"decode loop, {name}", f"{ms(var[f'loop_{name}']['per_step_s'])} / step")
            for name in DECODE_LOOPS
        ]
        rows += [
            ("inverse-CDF loop / current loop", f"{var['inverse_cdf_loop_over_current']:.2f}"),
            (
                "sampling ops, current / inverse CDF",
                f"{ms(var['sampling_current']['min_s'])} / {ms(var['sampling_inverse_cdf']['min_s'])}",
            ),
        ]
    if "grpo_step" in report:
        step = report["grpo_step"]
        for name in ("chunked", "one_chunk"):
            m = step[name]["memory"]
            total = m.get("temp_plus_argument_plus_output_bytes")
            rows.append(
                (
                    f"step memory, chunk={step[name]['logprob_chunk_size']}",
                    f"{mib(total)} (temp {mib(m['temp_size_in_bytes'])})" if total is not None else "n/a",
                )
            )
        rows += [
            ("step compile", f"{step['chunked']['compile_s']:.2f} s"),
            (
                "step time (mean / min)",
                f"{ms(step['step_time']['mean_s'])} / {ms(step['step_time']['min_s'])}",
            ),
            (
                "step achieved",
                f"{step['achieved_gflops']:.1f} GFLOP/s (cpu share {step['step_time']['cpu_share']:.2f})",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    cfg = PRESETS[FLAGS.preset]()
    overrides = {k: getattr(FLAGS, k) for k in ("repeats", "step_repeats") if getattr(FLAGS, k)}
    cfg = dataclasses.replace(cfg, **overrides)
    report = run_benchmarks(
        cfg,
        FLAGS.which,
        peak_hbm_gbps=FLAGS.peak_hbm_gbps,
        command=shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
    )
    print(format_table(report))
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {FLAGS.out}")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_list("which", list(BENCHMARKS), f"Benchmarks to run, any of {', '.join(BENCHMARKS)}.")
    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Model and batch setting (see PRESETS).")
    flags.DEFINE_string("out", None, "Write the JSON report here.")
    flags.DEFINE_float("peak_hbm_gbps", 3350.0, "Peak HBM bandwidth in GB/s for the GPU roofline (H100 SXM).")
    flags.DEFINE_integer("repeats", None, "Override the preset's timed calls per measurement.")
    flags.DEFINE_integer("step_repeats", None, "Override the preset's timed GRPO steps.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
