"""Benchmark the sampler and the GRPO step; print a table and write one JSON per run.

    python benchmarks/benchmark.py --preset=cpu --out=benchmarks/cpu.json
    python benchmarks/benchmark.py --preset=gpu --which=sampler --out=benchmarks/h100_sampler.json

Every timing runs after a warm-up call; compile time (lower + compile) is reported separately. Timed
quantities record mean / median / min over the repeats and the CPU share the process got; derived
rates and ratios use the min: on a shared machine other processes only ever add time.
What is measured and why (numbers in benchmarks/README.md):

sampler   generated tokens/s of `sampling.generate` (B prompts x G samples x L tokens, no early stop:
          `eos_id` = vocab_size, a token that is never sampled); the shared-prefix prefill (B prompts,
          then the KV cache fanned out G times) against the naive prefill of B*G prompts; one decode
          step measured in the loop, alone (`forward_with_cache`, cache donated), as its weight matmuls
          only, and the sampler's token choice alone (`sampling.choose_tokens`); FLOPs per decode step
          against this machine's measured peak matmul rate (the matmul bound), and bytes per step
          against the measured copy bandwidth (the memory bound) and, on a GPU, the HBM peak given by
          --peak_hbm_gbps.
step      the one-program GRPO step (`make_grpo_step`, μ = 1, β > 0 so the reference forward runs):
          step time and `compiled.memory_analysis()`, with the chunked logprob path at the preset's
          chunk size and with one chunk covering the whole sequence.

The decode loop with and without sampling, and the token choice against `jax.random.categorical`,
are in benchmarks/benchmark_decode.py. Settings, presets, timing and the analytic costs are shared with it
in `benchlib.py` (analytic costs: `grpo_jax.flops`). Only public names of grpo_jax are used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from benchlib import (  # noqa: F401  (PRESETS, BenchConfig, ...: the script's API)
    PRESETS,
    BenchConfig,
    compile_timed,
    environment,
    finish,
    measure_copy_bandwidth,
    measure_peak_matmul,
    prompts,
    ratio,
    time_calls,
    write_json,
)

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.flops import decode_step_costs, matmul_param_count  # noqa: F401  (the script's API)
from grpo_jax.models import forward_with_cache, init_cache, init_params, positions_from_mask
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    make_grpo_step,
    make_optimizer,
    rollout_to_batch,
)

BENCHMARKS = ("sampler", "step")
MOVED = {"variants": "benchmarks/benchmark_decode.py"}


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
    """The per-step token choice of the sampler alone (`sampling.choose_tokens`: log-softmax, one
    inverse-CDF draw per row, logprobs)."""
    return sampling.choose_tokens(logits, row_keys, step, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def bench_sampler(
    cfg: BenchConfig, params, peak_matmul_gflops: float, copy_gbps: float, peak_hbm_gbps: float | None
) -> tuple[dict[str, Any], Any]:
    """Sampler throughput, shared vs naive prefill, and one decode step against its bounds.
    -> (results, the last Rollout)."""
    model, n, G = cfg.model, cfg.num_rows, cfg.num_samples
    tokens, mask = prompts(cfg)
    rng = jax.random.key(1)
    static = dict(
        num_samples=G,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_id=model.vocab_size,  # never sampled: no early stop, every budget token is generated
        pad_id=0,
    )
    # The public sampler, jitted whole so its compile time can be taken apart from its run time.
    sampler = jax.jit(functools.partial(sampling.generate, model, **static))
    generate, generate_compile_s = compile_timed(sampler, params, tokens, mask, rng)
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
            "shared_over_naive": ratio(prefills["shared"]["min_s"], prefills["naive"]["min_s"]),
            "shared_without_fan_out_over_naive": ratio(
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
            "in_loop_over_matmul_bound": ratio(loop_step_s, matmul_bound_s),
            "isolated_over_matmul_bound": ratio(isolated["min_s"], matmul_bound_s),
            "matmuls_only_over_matmul_bound": ratio(matmuls_only["min_s"], matmul_bound_s),
            "in_loop_over_memory_bound": ratio(loop_step_s, memory_bound_s),
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
    param_sh = models.model_param_shardings(mesh, model)
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
        "chunked_over_one_chunk_memory": ratio(mem("chunked") or 0, mem("one_chunk") or 0),
        "chunked_over_one_chunk_temp": ratio(
            variants["chunked"]["memory"].get("temp_size_in_bytes", 0),
            variants["one_chunk"]["memory"].get("temp_size_in_bytes", 0),
        ),
    }


def run_benchmarks(
    cfg: BenchConfig,
    which: Sequence[str] = BENCHMARKS,
    *,
    peak_hbm_gbps: float | None = 3350.0,
    command: str = "",
) -> dict[str, Any]:
    """Run the selected benchmarks on `cfg`; -> one JSON-able dict (environment, config, results)."""
    for name in set(which) & set(MOVED):
        raise ValueError(f"benchmark {name!r} moved to {MOVED[name]}")
    unknown = set(which) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    report: dict[str, Any] = {**environment(command), "config": cfg.to_dict()}
    start, cpu_start = time.perf_counter(), time.process_time()
    params = init_params(cfg.model, jax.random.key(0))
    report["peak_matmul"] = measure_peak_matmul(cfg.matmul_size, cfg.model.dtype, cfg.repeats)
    report["copy_bandwidth"] = measure_copy_bandwidth(cfg.copy_mib, cfg.repeats)
    rollout = None
    if "sampler" in which:
        report["sampler"], rollout = bench_sampler(
            cfg, params, report["peak_matmul"]["gflops"], report["copy_bandwidth"]["gbps"], peak_hbm_gbps
        )
    if "step" in which:
        if rollout is None:
            tokens, mask = prompts(cfg)
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
    return finish(report, start, cpu_start)


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
    try:
        report = run_benchmarks(
            cfg,
            FLAGS.which,
            peak_hbm_gbps=FLAGS.peak_hbm_gbps,
            command=shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(format_table(report))
    if FLAGS.out:
        write_json(report, FLAGS.out)
        print(f"wrote {FLAGS.out}")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_list(
        "which",
        list(BENCHMARKS),
        f"Benchmarks to run, any of {', '.join(BENCHMARKS)} (decode loop variants: benchmark_decode.py).",
    )
    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Model and batch setting (see PRESETS).")
    flags.DEFINE_string("out", None, "Write the JSON report here.")
    flags.DEFINE_float("peak_hbm_gbps", 3350.0, "Peak HBM bandwidth in GB/s for the GPU roofline (H100 SXM).")
    flags.DEFINE_integer("repeats", None, "Override the preset's timed calls per measurement.")
    flags.DEFINE_integer("step_repeats", None, "Override the preset's timed GRPO steps.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
