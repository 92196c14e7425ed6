"""Long chains of thought in the update: compiled memory and step time of the GRPO step per attention
backend, on this machine (`--mode=cpu`), and whether a Qwen2.5-7B step fits a TPU slice at length
(`--mode=tpu`, compiled ahead of time with libtpu's compile-only devices). Writes
`benchmarks/long_context.json` (one entry per mode) and re-renders `benchmarks/long_context.md`.

    python benchmarks/long_context.py --mode=cpu --lengths=1024,2048,4096,8192 --impls=xla,chunked
    python benchmarks/long_context.py --mode=tpu --topologies=v5p:4x4x4,v5e:16x16 \
        --lengths=4096,8192,16384,32768 --impls=xla,splash
    python benchmarks/long_context.py --render   # the markdown from the JSON

CPU: a small Qwen2-style model (flags), one prompt × G rows of T tokens (a quarter prompt, the rest the
completion), the one-program GRPO step (β > 0: the reference forward included) compiled once; "peak" is
XLA's memory analysis of the compiled step (arguments + outputs + temporaries - aliased), and the step
time the median of `--steps` timed steps after one untimed. A step whose compiled temporaries exceed
`--max_run_gib` is compiled but not run. TPU: `scripts/aot_compile.py --programs=grpo_step` on
configs/gsm8k_qwen2_5.py with the Qwen2.5-7B preset, P = 1024 prompt tokens and L completion tokens,
each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "long_context")
GIB = 2**30


# ------------------------------------------------------------------------------------------------
# CPU: measured
# ------------------------------------------------------------------------------------------------


def cpu_point(args, length: int, impl: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grpo_jax import models, sharding
    from grpo_jax.algorithms import GRPOConfig
    from grpo_jax.training import (
        OptimizerConfig,
        create_train_state,
        make_grpo_step,
        make_optimizer,
    )

    config = models.ModelConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 3,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        remat=args.remat,
        attention_impl=impl,
        attention_block_size=args.block_size,
    )
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shardings = models.model_param_shardings(mesh, config)
    params = models.init_sharded_params(config, jax.random.key(0), mesh)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))
    state, state_sh = create_train_state(params, optimizer, mesh, shardings, rng=jax.random.key(1))
    grpo = GRPOConfig(num_generations=args.rows, kl_coef=0.04)
    step = make_grpo_step(
        grpo, config, optimizer, mesh=mesh, state_shardings=state_sh, logprob_chunk_size=256, donate=True
    )
    prompt_len = length // 4
    new_tokens = length - prompt_len
    rng = np.random.default_rng(0)
    n = args.rows
    batch = {
        "prompt_tokens": jnp.asarray(rng.integers(2, args.vocab_size, (n, prompt_len)), jnp.int32),
        "prompt_mask": jnp.ones((n, prompt_len), jnp.int32),
        "completion_tokens": jnp.asarray(rng.integers(2, args.vocab_size, (n, new_tokens)), jnp.int32),
        "completion_mask": jnp.ones((n, new_tokens), jnp.int32),
        "old_logprobs": jnp.full((n, new_tokens), -5.0, jnp.float32),
        "truncated": jnp.zeros((n,), bool),
        "host_rewards": jnp.arange(n, dtype=jnp.float32),
    }
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    point = {
        "length": length,
        "impl": impl,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile_s": compile_s,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes": int(peak),
    }
    if memory.temp_size_in_bytes > args.max_run_gib * GIB:
        point["skipped"] = f"temporaries above --max_run_gib={args.max_run_gib}"
        return point
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - start)
    point["step_s"] = statistics.median(times)
    point["loss"] = float(metrics["loss"])
    return point


def run_cpu(args) -> dict:
    import jax

    points = []
    for length in args.lengths:
        for impl in args.impls:
            # Each point in its own process: a long step's buffers do not stay around for the next.
            result = subprocess.run(
                [sys.executable, __file__, "--cpu_point", f"{length}:{impl}", *sys.argv[1:]],
                capture_output=True,
                text=True,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
            )
            if result.returncode:
                points.append({"length": length, "impl": impl, "error": result.stderr.strip()[-400:]})
            else:
                points.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(points[-1]), flush=True)
    model = {
        k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
    }
    return {
        "command": "python benchmarks/long_context.py "
        + " ".join(a for a in sys.argv[1:] if a != "--render"),
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
        "model": dict(model, remat=args.remat, rows=args.rows, block_size=args.block_size),
        "points": points,
    }


# ------------------------------------------------------------------------------------------------
# TPU: compiled ahead of time
# ------------------------------------------------------------------------------------------------


def run_tpu(args) -> dict:
    points = []
    for topology in args.topologies:
        for length in args.lengths:
            for impl in args.impls:
                command = [
                    sys.executable,
                    os.path.join(REPO, "scripts", "aot_compile.py"),
                    "--config=configs/gsm8k_qwen2_5.py",
                    f"--topology={topology}",
                    "--model_preset=qwen2.5-7b",
                    "--programs=grpo_step",
                    f"--config.mesh={args.mesh}",
                    "--config.max_prompt_len=1024",
                    f"--config.max_new_tokens={length}",
                    f"--config.grpo.prompts_per_step={args.prompts}",
                    f"--config.grpo.algo.num_generations={args.generations}",
                    f"--config.grpo.algo.num_minibatches={args.minibatches}",
                    f"--config.model.remat={args.tpu_remat}",
                    f"--config.model.attention_impl={impl}",
                    f"--config.model.attention_block_size={args.tpu_block_size}",
                    f"--config.logprob_chunk_size={args.logprob_chunk}",
                ]
                start = time.time()
                result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
                point = {
                    "topology": topology,
                    "length": length,
                    "impl": impl,
                    "prompts": args.prompts,
                    "wall_s": time.time() - start,
                }
                if result.returncode:
                    point["error"] = result.stderr.strip()[-400:]
                else:
                    report = json.loads(result.stdout.strip().splitlines()[-1])
                    step = report["programs"]["grpo_step"]
                    point.update(
                        fits=step["fits"],
                        peak_bytes_per_device=step["peak_bytes_per_device"],
                        hbm_bytes_per_device=report["hbm_bytes_per_device"],
                        mesh=report["mesh"],
                        batch=report["batch"],
                    )
                print(json.dumps(point), flush=True)
                points.append(point)
    return {
        "commands": ["python benchmarks/long_context.py " + " ".join(sys.argv[1:])],
        "setting": {
            "model": "qwen2.5-7b (bf16 compute, configs/gsm8k_qwen2_5.py)",
            "mesh": args.mesh,
            "prompt_len": 1024,
            "prompts": args.prompts,
            "num_generations": args.generations,
            "num_minibatches": args.minibatches,
            "remat": args.tpu_remat,
            "attention_block_size": args.tpu_block_size,
            "logprob_chunk_size": args.logprob_chunk,
        },
        "points": points,
    }


def merge_tpu(old: dict | None, new: dict) -> dict:
    """`new`'s points added to `old`'s (a rerun point replaces its twin) when both ran the same setting
    apart from the mesh and the prompts per step (a larger slice needs more rows for one per chip):
    several invocations, e.g. one per topology, make one table."""
    per_point = ("mesh", "prompts")
    same = lambda a, b: (
        {k: v for k, v in a.items() if k not in per_point}
        == {  # noqa: E731
            k: v for k, v in b.items() if k not in per_point
        }
    )
    for p in (old or {}).get("points", []):  # points from before prompts were recorded per point
        p.setdefault("prompts", old["setting"].get("prompts"))
    if not old or not same(old.get("setting", {}), new["setting"]):
        return new
    key = lambda p: (p["topology"], p["length"], p["impl"])  # noqa: E731
    points = {key(p): p for p in old["points"]}
    points.update({key(p): p for p in new["points"]})
    commands = old.get("commands", [old.get("command", "")]) + new["commands"]
    return dict(new, commands=[c for c in commands if c], points=sorted(points.values(), key=key))


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _gib(n) -> str:
    return f"{n / GIB:.2f}"


def render(report: dict) -> str:
    lines = ["# Long sequences in the GRPO update: attention backends", ""]
    cpu = report.get("cpu")
    if cpu:
        lines += [
            "## This CPU: compiled memory and step time, xla vs chunked",
            "",
            f"`{cpu['command']}` ({cpu['machine']}). Model: {cpu['model']}. T = prompt + completion "
            "(a quarter prompt); peak = XLA's memory analysis of the compiled step (arguments + outputs + "
            "temporaries); step time = median of the timed steps.",
            "",
            "| T | backend | temporaries GiB | peak GiB | step s | compile s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for p in cpu["points"]:
            if "error" in p:
                lines.append(f"| {p['length']} | {p['impl']} | error: {p['error'][-80:]} | | | |")
                continue
            step = f"{p['step_s']:.2f}" if "step_s" in p else p.get("skipped", "")
            lines.append(
                f"| {p['length']} | {p['impl']} | {_gib(p['temp_bytes'])} | {_gib(p['peak_bytes'])} | "
                f"{step} | {p['compile_s']:.0f} |"
            )
        lines.append("")
    tpu = report.get("tpu")
    if tpu:
        s = tpu["setting"]
        lines += [
            "## Ahead of time on TPU slices: Qwen2.5-7B, P = 1024 + L",
            "",
            "Made by "
            + ", ".join(f"`{c}`" for c in tpu.get("commands", [tpu.get("command", "")]))
            + f". G = {s['num_generations']} samples per prompt, "
            f"{s['num_minibatches']} minibatches, remat `{s['remat']}`, attention blocks "
            f"{s['attention_block_size']}, logprob chunks {s['logprob_chunk_size']}. Per-chip peak from the "
            "TPU compiler (a program that does not fit fails to compile and reports what it needed).",
            "",
            "| topology | mesh (data, fsdp, tensor) | prompts | L | backend | fits | peak GiB per chip "
            "| HBM GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in tpu["points"]:
            if "error" in p:
                lines.append(
                    f"| {p['topology']} | | {p.get('prompts', s['prompts'])} | {p['length']} | {p['impl']} "
                    f"| error | | {p['error'][-60:]} |"
                )
                continue
            mesh = ", ".join(str(p["mesh"][a]) for a in ("data", "fsdp", "tensor"))
            prompts = p.get("prompts", s["prompts"])
            lines.append(
                f"| {p['topology']} | {mesh} | {prompts} | {p['length']} | {p['impl']} | "
                f"{'yes' if p['fits'] else 'no'} | "
                f"{_gib(p['peak_bytes_per_device'])} | {_gib(p['hbm_bytes_per_device'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def write(report: dict) -> None:
    with open(OUT + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(OUT + ".md", "w") as f:
        f.write(render(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("cpu", "tpu"), default="cpu")
    parser.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192]
    )
    parser.add_argument("--impls", type=lambda s: s.split(","), default=None)
    parser.add_argument("--render", action="store_true", help="only re-render the markdown from the JSON")
    parser.add_argument("--cpu_point", default="", help=argparse.SUPPRESS)
    # CPU model and batch
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max_run_gib", type=float, default=8.0)
    # TPU
    parser.add_argument("--topologies", type=lambda s: s.split(","), default=["v5p:4x4x4", "v5e:16x16"])
    parser.add_argument("--mesh", default="(-1,16,4)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=8)
    parser.add_argument("--tpu_remat", default="full")
    parser.add_argument("--tpu_block_size", type=int, default=512)
    parser.add_argument("--logprob_chunk", type=int, default=64)
    args, _ = parser.parse_known_args()
    if args.cpu_point:
        length, impl = args.cpu_point.split(":")
        print(json.dumps(cpu_point(args, int(length), impl)))
        return
    report = json.load(open(OUT + ".json")) if os.path.exists(OUT + ".json") else {}
    if not args.render:
        if args.mode == "cpu":
            args.impls = args.impls or ["xla", "chunked"]
            report["cpu"] = run_cpu(args)
        else:
            args.impls = args.impls or ["xla", "splash"]
            report["tpu"] = merge_tpu(report.get("tpu"), run_tpu(args))
    write(report)
    print(render(report))


if __name__ == "__main__":
    main()
