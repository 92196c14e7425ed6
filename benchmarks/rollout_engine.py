"""The rollout engine against the static sampler: useful completion tokens per second and KV-cache bytes,
alternated in one run (issue 20, "Measured").

    python benchmarks/rollout_engine.py                       # long-tailed workload, the default sizes
    python benchmarks/rollout_engine.py --workload=uniform    # configs/bench_trl_d.py's setting
    python benchmarks/rollout_engine.py --prompt_len=256 --max_new_tokens=2048   # the issue's size
    python benchmarks/rollout_engine.py --preset=qwen2.5-0.5b --dtype=bfloat16 --prompt_len=512 \
        --max_new_tokens=4096 --repeats=1 --tag=gpu_qwen2.5-0.5b_P512_L4096      # the issue's GPU run

`--preset` takes the long-tailed model's shape from `grpo_jax.models.presets.MODEL_PRESETS` (layers,
widths, heads, vocabulary, q/k/v biases, RoPE theta), untied (its zeroed `lm_head` is the method below:
the head's matmul is the same as a tied one's); `--dtype` is its weights' and activations' dtype. On an
accelerator the peak matmul rate is measured in that dtype at 8192³ (2048³ float32 on CPU), and the
report names the device.

Workloads:
- `long_tailed` (default): B prompts x G samples of a random model whose completion lengths are
  geometric with mean about L/5 (`--mean_len`), capped at L, as in a real R1 run (most samples stop far
  before the budget, a few run into it). Method: the output head (`lm_head`, untied) is all zeros, so
  every logit is exactly 0 and the next token is uniform over the V ids at every step whatever the random
  layers compute; k = round(V / mean_len) ids (1 .. k) are stop tokens, so each step stops with
  probability exactly p = k/V, independently: a length is geometric(p) capped at L. The head's matmul
  still runs (the weights are arguments of the compiled program). The measured lengths (mean, p50, p90,
  max) are in the report.
- `uniform`: the peer setting of `configs/bench_trl_d.py` (its model, 8 prompts x G = 8, P = 32, exactly
  64 completion tokens: stop tokens suppressed by `min_new_tokens`), a random model with its own head.

Systems (each called on the same prompts and key, so they produce the same tokens; checked):
- `static`: `grpo_jax.sampling.generate`. Its KV cache is `rows x (P + L)` positions for the rows it
  decodes at once, so its memory decides how many rows it can take: `--static_rows` (a multiple of G;
  long_tailed's default: 16 of its N = 64 rows; uniform's and 0: all N = B·G rows in one call). With
  fewer, the N rows run in N / static_rows calls (whole groups per call; a row's tokens do not depend
  on its batch, so the tokens are the same).
- `engine_all_slots`: `grpo_jax.rollout.generate_with_stats` with S = N slots (`--slots`, default N).
- `engine_equal_memory`: the engine with the most slots S <= N whose page pool (prompt pages + S times a
  slot's worst case + the scratch page) takes no more bytes than the static sampler's cache. Today's
  engine reserves a slot's worst case, so at `--static_rows=N` this is S = N again (and is not run twice).

Each round calls every system once, in order (A B C A B C ...), after one untimed call each (compile).
Useful tokens are the generated tokens inside the mask (the stop token included); tokens/s divides them
by the median wall time of a system's calls. KV bytes: the static sampler's cache `[layers, rows, P + L,
K, Dh]` x 2 (k, v); the engine's pool `[layers, pages + 1, page_size, K, Dh]` x 2.

Matmul bound: each system's decode step does the weight matmuls of `flops.matmul_param_count` for the
rows it carries (the static sampler's rows per call; the engine's S slots, idle ones included: its step
is that shape whatever the occupancy); the bound is those FLOPs at this machine's peak matmul rate, a
jitted 2048³ float32 matmul timed in the same run, before and after the systems (the better of the two),
as benchmarks/benchmark.py measures it. `step ÷ bound` is how far a step is from it: the fastest timed
call (other processes only ever add time; its prefill included) over its decode steps, ÷ the bound.
The 2048³ rate is out of reach for a decode step's small matmuls ([rows, hidden] by [hidden, ...]), so
the report also times those matmuls alone (`matmul_chain_ms`: the step's q, k, v, o, MLP and head
projections for the same rows, chained through a jitted `fori_loop` of as many steps, no attention, no
sampling, no cache) in the same run: `step ÷ matmuls alone` is what the rest of the step costs on top.

Ends by printing one JSON line (per system: useful tokens/s, KV-cache bytes, speedup against static);
writes `benchmarks/rollout_engine.json` (one entry per workload, or per `--tag`), `.md` and `.png` unless
`--no_write` (`--report_only`: rewrite the `.md` and `.png` from the `.json`). To measure another
commit's engine with this script: `PYTHONPATH=<checkout of it> python
benchmarks/rollout_engine.py ... --tag=NAME` (the script passes only arguments every version takes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import measure_peak_matmul

from grpo_jax import flops, models, rollout, sampling
from grpo_jax.models.presets import MODEL_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "rollout_engine")

# Default sizes per workload (flags override). long_tailed: about 4-5 minutes on 2 quiet CPU cores (estimated
# from a smaller run on a loaded machine); the P = 256, L = 2048 is `--prompt_len=256
# --max_new_tokens=2048` (each decode step reads twice the positions over twice the steps: about 4x longer).
# static_rows = 16: the static sampler's memory holds a quarter of the N = 64 rows at once.
DEFAULTS = {
    "long_tailed": dict(
        prompts=8,
        num_samples=8,
        prompt_len=128,
        max_new_tokens=1024,
        mean_len=0,  # 0: L / 5
        static_rows=16,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=688,
        vocab_size=1024,
        page_size=16,
        repeats=3,
    ),
    "uniform": dict(page_size=16, repeats=3),  # the rest from configs/bench_trl_d.py
}


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------


def uniform_setting() -> dict:
    """configs/bench_trl_d.py's sampling setting: its model, prompts, G, P, L and min_new_tokens."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import bench_trl_d
    finally:
        sys.path.pop(0)
    from grpo_jax.training.setup import build_model_config

    c = bench_trl_d.get_config()
    model = build_model_config(c, types.SimpleNamespace(vocab_size=c.model.vocab_size))
    return dict(
        model=model,
        prompts=c.grpo.prompts_per_step,
        num_samples=c.grpo.algo.num_generations,
        prompt_len=c.max_prompt_len,
        max_new_tokens=c.max_new_tokens,
        min_new_tokens=c.grpo.min_new_tokens,
        temperature=c.grpo.algo.temperature,
    )


SHAPE_FLAGS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


def preset_extras(preset: str) -> dict:
    """A preset's model settings other than its shape and head tying (`--preset`; {} without one)."""
    if not preset:
        return {}
    return {k: v for k, v in MODEL_PRESETS[preset].items() if k not in SHAPE_FLAGS and k != "tie_embeddings"}


def peak_setting(dtype: str) -> tuple[int, str]:
    """(size, dtype) of the peak-rate matmul: 2048³ float32 on CPU, 8192³ in the model's dtype elsewhere."""
    return (2048, "float32") if jax.default_backend() == "cpu" else (8192, dtype)


def build(args) -> dict:
    """The workload: model config, params, prompts and sampling settings."""
    if args.workload == "uniform":
        w = uniform_setting()
        for name in ("prompts", "num_samples", "prompt_len", "max_new_tokens"):
            if getattr(args, name) is not None:
                w[name] = getattr(args, name)
        params = models.init_params(w["model"], jax.random.key(args.seed))
        w.update(
            stop_ids=(1,),
            method="configs/bench_trl_d.py: a random model, stop tokens suppressed "
            "by min_new_tokens = L (every row exactly L tokens)",
        )
    else:
        # benchmarks/partial_rollouts.py builds this workload from args without --preset/--dtype
        dtype = getattr(args, "dtype", "float32")
        model = models.ModelConfig(
            **preset_extras(getattr(args, "preset", "")),
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            tie_embeddings=False,
            param_dtype=dtype,
            dtype=dtype,
        )
        mean_len = args.mean_len or args.max_new_tokens / 5
        k = max(1, round(args.vocab_size / mean_len))
        params = models.init_params(model, jax.random.key(args.seed))
        params["lm_head"] = jnp.zeros_like(params["lm_head"])  # every logit 0: uniform next token
        p = k / args.vocab_size
        w = dict(
            model=model,
            prompts=args.prompts,
            num_samples=args.num_samples,
            prompt_len=args.prompt_len,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=0,
            temperature=1.0,
            stop_ids=tuple(range(1, k + 1)),
            stop_probability=p,
            expected_mean_len=(1 - (1 - p) ** args.max_new_tokens) / p,
            method=f"lm_head = 0 (every logit 0, uniform over V = {args.vocab_size}); stop ids 1..{k}: "
            f"each step stops with probability exactly p = {k}/{args.vocab_size}, lengths geometric(p) "
            "capped at L",
        )
    rng = np.random.default_rng(args.seed)
    shape = (w["prompts"], w["prompt_len"])
    w["params"] = params
    w["prompt_tokens"] = jnp.asarray(rng.integers(2, w["model"].vocab_size, shape), jnp.int32)
    w["prompt_mask"] = jnp.ones(shape, jnp.int32)
    return w


# ------------------------------------------------------------------------------------------------
# Systems
# ------------------------------------------------------------------------------------------------


def position_bytes(model: models.ModelConfig) -> int:
    """KV-cache bytes of one position: k and v, every layer."""
    return (
        2 * model.num_layers * model.num_kv_heads * model.resolved_head_dim * jnp.dtype(model.dtype).itemsize
    )


def engine_pool_pages(w: dict, slots: int, page_size: int) -> int:
    """The engine's pool for S slots (`engine.pool_geometry`): prompt pages + S worst cases + scratch.
    (An engine without `pool_geometry`, before the copy-on-write prompt tail: ceil((L - 1) / page_size)
    pages per slot.)"""
    from grpo_jax.rollout import engine

    if hasattr(engine, "pool_geometry"):
        geometry = engine.pool_geometry(
            w["prompts"], w["prompt_len"], w["max_new_tokens"], page_size=page_size, slots=slots
        )
        return geometry["num_pages"] + 1
    own = -(-(w["max_new_tokens"] - 1) // page_size)
    return w["prompts"] * -(-w["prompt_len"] // page_size) + slots * max(own, 1) + 1


def equal_memory_slots(w: dict, static_bytes: int, page_size: int) -> int:
    """The most slots S <= N whose pool is no larger than `static_bytes` (at least 1)."""
    n = w["prompts"] * w["num_samples"]
    per_page = page_size * position_bytes(w["model"])
    slots = n
    while slots > 1 and engine_pool_pages(w, slots, page_size) * per_page > static_bytes:
        slots -= 1
    return slots


def make_systems(w: dict, args) -> dict:
    """name -> (call() -> (tokens, mask, lengths, iterations), description dict)."""
    g, n = w["num_samples"], w["prompts"] * w["num_samples"]
    static_rows = args.static_rows or n
    if static_rows % g or n % static_rows:
        raise ValueError(f"--static_rows={static_rows} must be a multiple of G = {g} dividing N = {n}")
    common = dict(
        num_samples=g,
        max_new_tokens=w["max_new_tokens"],
        temperature=w["temperature"],
        eos_id=w["stop_ids"][0],
        stop_ids=w["stop_ids"][1:],
        min_new_tokens=w["min_new_tokens"],
    )
    key = jax.random.key(args.seed + 1)
    per_call = static_rows // g

    def static():
        outs = [
            sampling.generate(
                w["model"],
                w["params"],
                w["prompt_tokens"][i : i + per_call],
                w["prompt_mask"][i : i + per_call],
                key,
                **common,
            )
            for i in range(0, w["prompts"], per_call)
        ]
        cat = lambda name: jnp.concatenate([getattr(o, name) for o in outs])  # noqa: E731
        return cat("tokens"), cat("mask"), cat("lengths"), sum(o.num_steps for o in outs)

    def engine(slots):
        def call():
            out, stats = rollout.generate_with_stats(
                w["model"],
                w["params"],
                w["prompt_tokens"],
                w["prompt_mask"],
                key,
                num_slots=slots,
                page_size=args.page_size,
                **common,
            )
            return out.tokens, out.mask, out.lengths, stats.iterations

        return call

    pb = position_bytes(w["model"])
    static_bytes = static_rows * (w["prompt_len"] + w["max_new_tokens"]) * pb
    page_bytes = args.page_size * pb
    all_slots = min(args.slots or n, n)
    equal = equal_memory_slots(w, static_bytes, args.page_size)
    systems = {
        "static": (static, dict(rows_per_call=static_rows, calls=n // static_rows, kv_bytes=static_bytes)),
        "engine_all_slots": (
            engine(all_slots),
            dict(slots=all_slots, kv_bytes=engine_pool_pages(w, all_slots, args.page_size) * page_bytes),
        ),
    }
    equal_info = dict(slots=equal, kv_bytes=engine_pool_pages(w, equal, args.page_size) * page_bytes)
    if equal == all_slots:
        equal_info["same_as"] = "engine_all_slots"
    else:
        systems["engine_equal_memory"] = (engine(equal), equal_info)
    return systems, equal_info


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def matmul_chain_ms(model: models.ModelConfig, rows: int, steps: int, repeats: int) -> float:
    """Fastest ms per step of the decode step's weight matmuls alone (`flops.matmul_param_count`'s
    projections, in the model's dtype, for `rows` rows), chained through `steps` iterations of a jitted
    `fori_loop`: what a decode step would cost if it did nothing but its matmuls at this machine's
    small-matmul rate."""
    d, f, dh = model.hidden_size, model.intermediate_size, model.resolved_head_dim
    keys = iter(jax.random.split(jax.random.key(0), 8 * model.num_layers + 2))
    dtype = jnp.dtype(model.dtype)
    weight = lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)  # noqa: E731
    layers = [
        dict(
            q=weight(d, model.num_heads * dh),
            k=weight(d, model.num_kv_heads * dh),
            v=weight(d, model.num_kv_heads * dh),
            o=weight(model.num_heads * dh, d),
            gate=weight(d, f),
            up=weight(d, f),
            down=weight(f, d),
        )
        for _ in range(model.num_layers)
    ]
    head = weight(d, model.vocab_size)

    @jax.jit
    def chain(x, layers, head):
        def step(_, x):
            for w in layers:
                keys_and_values = jnp.sum(x @ w["k"]) + jnp.sum(x @ w["v"])
                x = x + (x @ w["q"]) @ w["o"] + 0.0 * keys_and_values
                x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
            return x + 1e-6 * (x @ head)[:, :1]

        return jax.lax.fori_loop(0, steps, step, x)

    x = weight(rows, d)
    jax.block_until_ready(chain(x, layers, head))
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        jax.block_until_ready(chain(x, layers, head))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times) / steps


def percentiles(lengths: np.ndarray) -> dict:
    return {
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "min": int(lengths.min()),
    }


def run(args, command: str) -> dict:
    w = build(args)
    systems, equal_info = make_systems(w, args)
    peak_size, peak_dtype = peak_setting(w["model"].dtype)
    peaks = [measure_peak_matmul(peak_size, peak_dtype, 3)["gflops"]]
    results, outputs = {}, {}
    for name, (call, info) in systems.items():  # the untimed first call of each: compile + run
        start = time.perf_counter()
        outputs[name] = jax.device_get(jax.block_until_ready(call()))
        results[name] = dict(info, first_call_s=time.perf_counter() - start, times_s=[])
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(args.repeats):  # alternated: A B C A B C ...
        for name, (call, _) in systems.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            results[name]["times_s"].append(time.perf_counter() - start)
    cpu_share = (
        (time.process_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9) / os.cpu_count()
    )
    peaks.append(measure_peak_matmul(peak_size, peak_dtype, 3)["gflops"])
    peak_flops = max(peaks) * 1e9
    chain_ms = {}  # rows -> ms per step of the matmuls alone

    ref_tokens, ref_mask, ref_lengths, _ = outputs["static"]
    for name, r in results.items():
        tokens, mask, lengths, steps = outputs[name]
        r["useful_tokens"] = int(np.sum(mask))
        r["decode_steps"] = int(steps)  # static: Σ over its calls of the longest row; engine: iterations
        r["median_s"] = statistics.median(r["times_s"]) if r["times_s"] else r["first_call_s"]
        r["useful_tokens_per_s"] = r["useful_tokens"] / r["median_s"]
        r["ms_per_decode_step"] = 1e3 * r["median_s"] / max(r["decode_steps"], 1)
        # The bound's ratio takes the fastest call (other processes only ever add time), prefill included.
        r["min_s"] = min(r["times_s"]) if r["times_s"] else r["first_call_s"]
        r["ms_per_decode_step_min"] = 1e3 * r["min_s"] / max(r["decode_steps"], 1)
        step_rows = r.get("slots", r.get("rows_per_call"))
        r["decode_step_matmul_flops"] = 2.0 * flops.matmul_param_count(w["model"]) * step_rows
        r["matmul_bound_ms"] = 1e3 * r["decode_step_matmul_flops"] / peak_flops
        r["step_over_matmul_bound"] = r["ms_per_decode_step_min"] / r["matmul_bound_ms"]
        if step_rows not in chain_ms:
            chain_ms[step_rows] = matmul_chain_ms(w["model"], step_rows, r["decode_steps"], args.repeats)
        r["matmuls_alone_ms"] = chain_ms[step_rows]
        r["step_over_matmuls_alone"] = r["ms_per_decode_step_min"] / r["matmuls_alone_ms"]
        r["tokens_equal_static"] = bool(np.array_equal(tokens, ref_tokens) and np.array_equal(mask, ref_mask))
    for r in results.values():
        r["speedup_vs_static"] = r["useful_tokens_per_s"] / results["static"]["useful_tokens_per_s"]
    if "same_as" in equal_info:
        results["engine_equal_memory"] = dict(
            equal_info,
            **{
                k: results["engine_all_slots"][k]
                for k in ("useful_tokens_per_s", "speedup_vs_static", "useful_tokens", "median_s")
            },
        )

    lengths = np.asarray(ref_lengths)
    workload = {k: v for k, v in w.items() if k not in ("model", "params", "prompt_tokens", "prompt_mask")}
    workload.update(
        rows=w["prompts"] * w["num_samples"],
        page_size=args.page_size,
        repeats=args.repeats,
        lengths=percentiles(lengths),
        truncated_frac=float(np.mean(lengths >= w["max_new_tokens"])),
        model=dict(
            {
                k: getattr(w["model"], k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_layers",
                    "num_heads",
                    "num_kv_heads",
                    "dtype",
                )
            },
            num_params=w["model"].num_params(),
        ),
    )
    return {
        "command": command,
        "workload_name": args.workload,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, {jax.default_backend()}, jax {jax.__version__}",
        "device": jax.devices()[0].device_kind,
        "peak_matmul": f"{peak_size}³ {peak_dtype}",
        "load_average_start": list(os.getloadavg()),
        "timed_cpu_share": cpu_share,
        "peak_matmul_gflops": peaks,  # before and after the systems; the bound uses the larger
        "tag": args.tag or args.workload,
        "workload": workload,
        "systems": results,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def summary(report: dict) -> dict:
    """The one JSON line: per system its useful tokens/s, KV-cache bytes and speedup against static."""
    return {
        "workload": report["workload_name"],
        **{
            name: {
                "useful_tokens_per_s": r["useful_tokens_per_s"],
                "kv_cache_bytes": r["kv_bytes"],
                "speedup_vs_static": r["speedup_vs_static"],
                "useful_tokens": r["useful_tokens"],
                **({"slots": r["slots"]} if "slots" in r else {}),
            }
            for name, r in report["systems"].items()
        },
    }


def render(reports: dict) -> str:
    lines = [
        "# Rollout engine vs static sampler: useful tokens/s at the KV-cache memory each holds",
        "",
        "`benchmarks/rollout_engine.py` (its docstring has the method). Useful tokens = generated tokens "
        "inside the mask; tokens/s = useful tokens / median wall time of the timed calls, the systems "
        "alternated in one process after one untimed call each. On a shared machine compare the systems of "
        "one entry (they alternate in one process) and ratios to the bound (the peak is measured in the same "
        "run); entries ran under the load and CPU share each states.",
        "",
    ]
    for name, r in reports.items():
        w = r["workload"]
        m = w["model"]
        lines += [
            f"## Workload `{r['workload_name']}`" + (f" (`{name}`)" if name != r["workload_name"] else ""),
            "",
            (
                f"grpo_jax of commit `{name.split('@')[1].split('#')[0]}` (this script run with "
                "`PYTHONPATH=` "
                "a checkout of it). "
                if "@" in name
                else ""
            )
            + f"Made by `{r['command']}` ({r['date_utc']}; {r['machine']}"
            + (f", {r['device']}" if r.get("device", "cpu") != "cpu" else "")
            + "; load average at the start "
            f"{r['load_average_start'][0]:.2f}, CPU share while timed {r['timed_cpu_share']:.2f}).",
            "",
            f"B = {w['prompts']} prompts × G = {w['num_samples']} = N = {w['rows']} rows, "
            f"P = {w['prompt_len']}, L = {w['max_new_tokens']}, page size {w['page_size']}, "
            f"{w['repeats']} timed rounds. Model: "
            f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads, "
            f"{m['num_kv_heads']} KV heads, MLP {m['intermediate_size']}, vocab {m['vocab_size']}, "
            f"{m['dtype']} "
            f"({m['num_params'] / 1e6:.1f} M params). Lengths: {w['method']}.",
            "",
            "Measured completion lengths: mean {mean:.1f}, p50 {p50:.0f}, p90 {p90:.0f}, max {max}, "
            "min {min}".format(**w["lengths"])
            + f"; {100 * w['truncated_frac']:.1f} % reached L"
            + (f" (expected mean {w['expected_mean_len']:.1f})." if "expected_mean_len" in w else "."),
            "",
            f"Peak matmul rate ({r.get('peak_matmul', '2048³ float32')}, before / after the systems): "
            + " / ".join(f"{g:.0f}" for g in r.get("peak_matmul_gflops", []))
            + " GFLOP/s.",
            "",
            "| system | slots / rows per call | KV-cache MiB | decode steps | ms / step (median; min) "
            "| matmul bound ms | step ÷ bound (min) | matmuls alone ms | step ÷ matmuls alone | median s "
            "| useful tokens | useful tokens/s | vs static | tokens = static's |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for sname, s in r["systems"].items():
            if "same_as" in s:
                lines.append(
                    f"| {sname} | S = {s['slots']} | {s['kv_bytes'] / 2**20:.1f} | (same program as "
                    f"`{s['same_as']}`) | | | | | | | | | | |"
                )
                continue
            rows = f"S = {s['slots']}" if "slots" in s else f"{s['rows_per_call']} × {s['calls']} calls"
            bound = (
                f"{s['matmul_bound_ms']:.2f} | {s['step_over_matmul_bound']:.2f}×"
                if "matmul_bound_ms" in s
                else "— | —"
            )
            bound += (
                f" | {s['matmuls_alone_ms']:.2f} | {s['step_over_matmuls_alone']:.2f}×"
                if "matmuls_alone_ms" in s
                else " | — | —"
            )
            lines.append(
                f"| {sname} | {rows} | {s['kv_bytes'] / 2**20:.1f} | {s['decode_steps']} | "
                f"{s['ms_per_decode_step']:.1f}"
                + (f"; {s['ms_per_decode_step_min']:.1f}" if "ms_per_decode_step_min" in s else "")
                + f" | {bound} | {s['median_s']:.2f} | "
                f"{s['useful_tokens']} | {s['useful_tokens_per_s']:.0f} | {s['speedup_vs_static']:.2f}× | "
                f"{'yes' if s['tokens_equal_static'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(reports: dict, path: str) -> bool:
    """OUT.png: per entry of this checkout (no `@commit` tags), each system's useful tokens/s (left) and
    KV-cache bytes (right), both as multiples of the static sampler's in the same run. False (and no
    file) without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no plot written")
        return False
    entries = [(name, r) for name, r in reports.items() if "@" not in name]
    systems = ("static", "engine_all_slots", "engine_equal_memory")
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.9 * len(entries)))
    for ax, key, label in (
        (axes[0], "speedup_vs_static", "useful completion tokens/s, x the static sampler's (higher: better)"),
        (axes[1], "kv_bytes", "KV-cache bytes, x the static sampler's"),
    ):
        for j, system in enumerate(systems):
            values = [r["systems"].get(system, {}).get(key, 0.0) for _, r in entries]
            if key == "kv_bytes":
                values = [v / r["systems"]["static"]["kv_bytes"] for v, (_, r) in zip(values, entries)]
            bars = ax.barh(
                [i + 0.27 * (j - 1) for i in range(len(entries))], values, height=0.25, label=system
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_yticks(range(len(entries)), [name for name, _ in entries])
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Rollout engine vs static sampler (benchmarks/rollout_engine.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=tuple(DEFAULTS), default="long_tailed")
    parser.add_argument("--prompts", type=int, default=None, help="B distinct prompts")
    parser.add_argument("--num_samples", "--G", type=int, default=None, help="G samples per prompt")
    parser.add_argument("--prompt_len", type=int, default=None, help="P")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="the budget L")
    parser.add_argument("--mean_len", type=float, default=None, help="long_tailed: mean length (0: L / 5)")
    parser.add_argument("--static_rows", type=int, default=None, help="rows per static call (0: all N)")
    parser.add_argument("--slots", type=int, default=0, help="engine_all_slots' S (0: N)")
    parser.add_argument("--page_size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    for name in SHAPE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="long_tailed model shape")
    parser.add_argument(
        "--preset", default="", choices=("", *MODEL_PRESETS), help="long_tailed model shape of a preset"
    )
    parser.add_argument("--dtype", default="float32", help="long_tailed weights' and activations' dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=OUT, help="OUT.json (one entry per workload) and OUT.md")
    parser.add_argument("--no_write", action="store_true")
    parser.add_argument("--tag", default="", help="the entry's name in OUT.json (default: the workload)")
    parser.add_argument("--report_only", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if (args.preset or args.dtype != "float32") and args.workload != "long_tailed":
        parser.error("--preset and --dtype set the long_tailed workload's model (uniform's is bench_trl_d's)")
    preset_shape = {k: v for k, v in MODEL_PRESETS.get(args.preset, {}).items() if k in SHAPE_FLAGS}
    for name, value in {**DEFAULTS[args.workload], **preset_shape}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.static_rows = args.static_rows or 0
    if args.report_only:
        reports = json.load(open(args.out + ".json"))
        with open(args.out + ".md", "w") as f:
            f.write(render(reports))
        plot(reports, args.out + ".png")
        return reports
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/rollout_engine.py", *argv])
    report = run(args, command)
    if not args.no_write:
        path = args.out + ".json"
        reports = json.load(open(path)) if os.path.exists(path) else {}
        reports[args.tag or args.workload] = report
        with open(path, "w") as f:
            json.dump(reports, f, indent=2)
            f.write("\n")
        with open(args.out + ".md", "w") as f:
            f.write(render(reports))
        plot(reports, args.out + ".png")
    line = summary(report)
    print(json.dumps(line), flush=True)
    return report


if __name__ == "__main__":
    main()
