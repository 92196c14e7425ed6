"""Does the pipelined GRPO step (`config.grpo.off_policy_steps = 1`) overlap sampling and training on
this CPU? The sampler and the trainer on disjoint fake CPU devices (`config.sampler_mesh = (1, 1)`: the
sampler on device 1, the trainer's (1, 1, 1) mesh on device 0), k = 1 against k = 0 (synchronous),
alternated in one process (docs/ARCHITECTURE.md, "Asynchronous GRPO"; docs/SCALING.md).

    python benchmarks/async.py                 # both thread settings, writes benchmarks/async.md/.json
    python benchmarks/async.py --threads=one   # one setting only, no files (--write to write them)

Each thread setting runs in its own child process (XLA_FLAGS are read once, at start):
- `one`: `--xla_cpu_multi_thread_eigen=false`, so each program's ops run on one thread, which lets the
  two devices' programs take a core each;
- `default`: XLA:CPU's own intra-op thread pool (each program may spread over both cores).

In a child: `rounds` rounds of (k = 0 run, k = 1 run), each a GRPO-only run of the quickstart config
(`configs/quickstart.py`, its model: 3 layers, hidden 128; `prompts` prompts × G = 4, 40 new tokens) of
`steps` steps through `trainer.train`, the programs compiled once per process (a persistent compilation
cache in a temporary directory). The first `warmup` steps of each run are dropped (compiles; at k = 1 the
first step samples its own rollout). Per run, the medians over the steady steps of `step_time_s`,
`sample_time_s` and, at k = 1, `train_time_s` and `pipeline/sample_wait_time_s`; at k = 0 the training part is
`step_time_s − sample_time_s − sync/time_s` (host rewards included). The verdict compares the k = 1 step
with the k = 0 parts: overlap means step(k=1) ≈ max(sample, train), none means ≈ sample + train.

Each child also runs a concurrency probe (the same small program alone on device 0, then on devices 0
and 1 together: does this host run two devices' programs side by side?). `--trace`: record a
jax.profiler trace of 3 steady k = 1 steps and report, per XLA:CPU runtime thread, the seconds it was
executing, and the seconds two threads executed at the same time.

The load average is recorded at the start and the end (other jobs share the cores; every time is then
inflated, and overlap needs a free core).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "async")
THREADS = {"one": "--xla_cpu_multi_thread_eigen=false", "default": ""}


def _median(lines: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in lines)


def child(args) -> dict:
    """One thread setting, in this process: alternate k = 0 and k = 1 runs; return their numbers."""
    import importlib.util

    import jax

    from grpo_jax.training import trainer

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="async_bench_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(ROOT, "configs", "quickstart.py")
    )
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)

    def config(k: int):
        c = quickstart.get_config()
        c.stages = ("grpo",)
        c.tensorboard = False
        c.mesh = (1, 1, 1)
        c.sampler_mesh = (1, 1)
        c.grpo.update(
            steps=args.steps,
            prompts_per_step=args.prompts,
            eval_every=0,
            eval_at_end=False,
            checkpoint_every=10_000,
            off_policy_steps=k,
        )
        c.max_new_tokens = args.max_new_tokens
        c.grpo.algo.dynamic_sampling_refill = False
        c.grpo.algo.is_correction = "token_tis"
        return c

    runs = []
    for round_ in range(args.rounds):
        for k in (0, 1):
            workdir = tempfile.mkdtemp(prefix=f"async_bench_k{k}_")
            t0 = time.time()
            trainer.train(config(k), workdir)
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                lines = [json.loads(line) for line in f if '"grpo"' in line]
            steady = [x for x in lines if x["stage"] == "grpo"][args.warmup :]
            run = {"round": round_, "k": k, "wall_s": time.time() - t0, "steps": len(steady)}
            run.update(step_s=_median(steady, "step_time_s"), sample_s=_median(steady, "sample_time_s"))
            if k:
                run.update(
                    train_s=_median(steady, "train_time_s"),
                    sample_wait_s=_median(steady, "pipeline/sample_wait_time_s"),
                )
            else:
                run["train_s"] = statistics.median(
                    x["step_time_s"] - x["sample_time_s"] - x.get("sync/time_s", 0.0) for x in steady
                )
            runs.append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    out = {"runs": runs, "devices": [str(d) for d in jax.devices()], "probe": concurrency_probe()}
    if args.trace:
        out["trace"] = trace_summary(config(1), args)
    return out


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in x for b0, b1 in y)


def trace_summary(c, args) -> dict:
    """A k = 1 run of warmup + 3 steps under jax.profiler (host tracer level 3, where XLA:CPU records its
    executions per runtime thread; the Python tracer off). Over the last 3 steps' wall time: per
    `XLAPjRtCpuClient` thread (one per fake device that ran something), the seconds it was executing (the
    union of its outermost events) and the seconds two such threads executed at the same time."""
    import jax

    from grpo_jax.training import trainer

    c.grpo.steps = args.warmup + 3
    logdir, workdir = tempfile.mkdtemp(prefix="async_trace_"), tempfile.mkdtemp(prefix="async_bench_t_")
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level, options.python_tracer_level = 3, 0
    with jax.profiler.trace(logdir, profiler_options=options):
        trainer.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        window = sum(json.loads(line)["step_time_s"] for line in f.readlines()[-3:]) * 1e6
    paths = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs if f.endswith(".trace.json.gz")]
    with gzip.open(paths[0]) as f:
        events = json.load(f)["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    runs: dict = {}
    for e in events:
        name = threads.get((e.get("pid"), e.get("tid")), "")
        if e.get("ph") == "X" and "XLAPjRtCpuClient" in name:
            runs.setdefault(name, []).append((e["ts"], e["ts"] + e["dur"]))
    end = max(b for spans in runs.values() for _, b in spans)
    busy = {
        name: _union([(max(a, end - window), b) for a, b in spans if b > end - window])
        for name, spans in runs.items()
    }
    busy = {name: spans for name, spans in busy.items() if spans}
    names = sorted(busy, key=lambda n: -sum(b - a for a, b in busy[n]))
    both = sum(_intersection(busy[x], busy[y]) for i, x in enumerate(names) for y in names[i + 1 :])
    return {
        "window_s": window / 1e6,
        "threads": {n: sum(b - a for a, b in busy[n]) / 1e6 for n in names},
        "both_s": both / 1e6,
    }


def concurrency_probe(repeats: int = 5) -> dict:
    """Can this host run two programs on its two fake devices at once? The same jitted program (40
    chained 512² matmuls, float32) on device 0 alone, then on devices 0 and 1 dispatched together; the
    median wall times and their ratio (1: the two ran side by side on two free cores; 2: one after the
    other, or time-sliced on one)."""
    import jax
    import jax.numpy as jnp

    def work(x):
        return jax.lax.fori_loop(0, 40, lambda i, x: jnp.tanh(x @ x.T) / 512.0, x)

    f = jax.jit(work)
    xs = [jax.device_put(jnp.ones((512, 512)), d) for d in jax.devices()[:2]]
    for x in xs:
        f(x).block_until_ready()

    def timed(inputs) -> float:
        t0 = time.perf_counter()
        for out in [f(x) for x in inputs]:
            out.block_until_ready()
        return time.perf_counter() - t0

    alone = statistics.median(timed(xs[:1]) for _ in range(repeats))
    together = statistics.median(timed(xs) for _ in range(repeats))
    return {"alone_s": alone, "together_s": together, "ratio": together / alone}


def run_child(threads: str, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.environ.get("PYTHONPATH", ROOT))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f and "eigen" not in f]
    env["XLA_FLAGS"] = " ".join(
        [*flags, "--xla_force_host_platform_device_count=2", THREADS[threads]]
    ).strip()
    command = [sys.executable, os.path.abspath(__file__), "--child", f"--threads={threads}"]
    command += [
        f"--{k}={getattr(args, k)}" for k in ("rounds", "steps", "warmup", "prompts", "max_new_tokens")
    ]
    command += ["--trace"] if args.trace else []
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["xla_flags"] = env["XLA_FLAGS"]
    return out


def summarise(result: dict) -> dict:
    """Medians over rounds per k, and the verdict (see the module docstring)."""
    by_k = {k: [r for r in result["runs"] if r["k"] == k] for k in (0, 1)}
    med = lambda k, key: statistics.median(r[key] for r in by_k[k])
    sample, train = med(0, "sample_s"), med(0, "train_s")
    step0, step1 = med(0, "step_s"), med(1, "step_s")
    serial, overlapped = sample + train, max(sample, train)
    # where k = 1's step falls between full overlap (0) and none (1)
    position = (step1 - overlapped) / (serial - overlapped) if serial > overlapped else float("nan")
    return {
        "k0_step_s": step0,
        "k0_sample_s": sample,
        "k0_train_s": train,
        "k1_step_s": step1,
        "k1_sample_s": med(1, "sample_s"),
        "k1_train_s": med(1, "train_s"),
        "k1_sample_wait_s": med(1, "sample_wait_s"),
        "sum_s": serial,
        "max_s": overlapped,
        "speedup": step0 / step1,
        "overlap_position": position,  # 0: step = max(sample, train); 1: step = sample + train
    }


def verdict(summary: dict, result: dict, load: float, cores: int) -> str:
    """One sentence on whether k = 1 overlapped sampling and training here, and why not when it did not."""
    position, probe = summary["overlap_position"], result["probe"]["ratio"]
    trace = result.get("trace")
    overlapped = position < 0.5
    text = (
        f"the k = 1 step ({summary['k1_step_s']:.2f} s) sits at {position:.2f} between max(sample, train) "
        f"({summary['max_s']:.2f} s) and their sum ({summary['sum_s']:.2f} s): "
        + (
            "it overlaps. "
            if overlapped
            else "**little overlap on this host.** "
            if position < 0.9
            else "**no overlap on this host.** "
        )
    )
    if trace:
        text += (
            f"The runtime did run the two devices' programs at the same time ({trace['both_s']:.2f} s of "
            f"{trace['window_s']:.2f} s in the trace), "
        )
    if not overlapped:
        text += f"and two programs together took {probe:.2f}× one alone (the probe). "
        text += (
            f"With a load average of {load:.1f} on {cores} cores there is no free core for the second "
            "program: side by side the two only share the cores, and the pipeline cannot shorten the step "
            "on this host."
            if load >= cores or probe > 1.3
            else "The cores were free, so the step is bound elsewhere (host work between the programs)."
        )
    return text


def write(report: dict) -> None:
    with open(OUT + ".json", "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    lines = [
        "# Asynchronous GRPO on a 2-core CPU: does k = 1 overlap sampling and training?",
        "",
        f"Made by `{report['command']}` ({report['date_utc']}; {report['machine']}; load average "
        f"{report['load_average_start'][0]:.2f} at the start, {report['load_average_end'][0]:.2f} at the "
        "end). "
        "Sampler on fake CPU device 1 (`config.sampler_mesh=(1, 1)`), trainer on device 0; the quickstart "
        "model (3 layers, hidden 128), GRPO only; medians over the steady steps of each run and over the "
        "rounds (k = 0 and k = 1 alternated). What each column is: `benchmarks/async.py`'s docstring.",
        "",
        "| threads | k=0 step | k=0 sample | k=0 train | sum | max | k=1 step | k=1 sample wait | speedup | "
        "position (0 = max, 1 = sum) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        lines.append(
            f"| {name} | {s['k0_step_s']:.3f} s | {s['k0_sample_s']:.3f} s | {s['k0_train_s']:.3f} s | "
            f"{s['sum_s']:.3f} s | {s['max_s']:.3f} s | {s['k1_step_s']:.3f} s | "
            f"{s['k1_sample_wait_s']:.3f} s | "
            f"{s['speedup']:.2f}× | {s['overlap_position']:.2f} |"
        )
    lines += ["", "Verdict, per thread setting (computed from the numbers above):", ""]
    for name, summary in report["summary"].items():
        load, cores = max(report["load_average_start"][0], report["load_average_end"][0]), os.cpu_count()
        lines.append(f"- `{name}`: " + verdict(summary, report["results"][name], load, cores))
    for name, result in report["results"].items():
        p = result["probe"]
        lines += [
            "",
            f"Threads `{name}`: the concurrency probe (one jitted program alone on device 0, then on devices "
            f"0 and 1 together): {p['alone_s']:.3f} s alone, {p['together_s']:.3f} s together, ratio "
            f"{p['ratio']:.2f} (1 = side by side, 2 = one after the other).",
        ]
        if "trace" in result:
            t = result["trace"]
            per_thread = ", ".join(f"`{n}` {v:.2f} s" for n, v in t["threads"].items())
            lines.append(
                f"Profiler trace of 3 steady k = 1 steps ({t['window_s']:.2f} s): XLA:CPU runtime threads "
                f"executing: {per_thread}; two of them at the same time: {t['both_s']:.2f} s."
            )
    for run in report.get("previous_runs", []):
        lines += [
            "",
            f"An earlier run of the same command ({run['date_utc']}, load average {run['load_average']:.2f} "
            "at the start), k = 1 step against k = 0: "
            + ", ".join(f"`{name}` {speedup:.2f}×" for name, speedup in run["speedup"].items())
            + ".",
        ]
    delta = os.path.join(ROOT, "benchmarks", "weight_delta.json")
    if os.path.exists(delta):  # benchmarks/weight_delta.py's section stays at the end of the file
        from weight_delta import markdown

        with open(delta) as f:
            lines += ["", *markdown(json.load(f))]
    with open(OUT + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="one,default", help="comma-separated: one, default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--write", action="store_true", help="write benchmarks/async.md/.json")
    parser.add_argument("--report_only", action="store_true", help="rewrite async.md from async.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report_only:
        with open(OUT + ".json") as f:
            write(json.load(f))
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    import jax

    settings = args.threads.split(",")
    report = {
        "command": "python " + shlex.join(["benchmarks/async.py", *sys.argv[1:]]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
        "load_average_start": list(os.getloadavg()),
        "results": {},
    }
    for threads in settings:
        report["results"][threads] = run_child(threads, args)
    report["load_average_end"] = list(os.getloadavg())
    report["summary"] = {name: summarise(r) for name, r in report["results"].items()}
    if os.path.exists(OUT + ".json") and (args.write or args.threads == "one,default"):
        with open(OUT + ".json") as f:  # the runs before this one stay listed (their speedups)
            before = json.load(f)
        report["previous_runs"] = before.get("previous_runs", []) + [
            {
                "date_utc": before["date_utc"],
                "load_average": before["load_average_start"][0],
                "speedup": {name: s["speedup"] for name, s in before["summary"].items()},
            }
        ]
    print(json.dumps(report["summary"]))
    if args.write or args.threads == "one,default":
        write(report)


if __name__ == "__main__":
    main()
