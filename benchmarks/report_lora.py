"""LoRA vs full GRPO: `benchmarks/lora.json` and `benchmarks/lora.md`.

    python benchmarks/report_lora.py --mode=quickstart --seeds=0,1,2 --root=workdirs/lora_sweep
    python benchmarks/report_lora.py --mode=tpu      # ahead-of-time compiles, one after another
    python benchmarks/report_lora.py --render        # the markdown from the JSON

`quickstart`: `scripts/sweep.py` on `configs/lora.py` (its `get_sweep`: full GRPO at the quickstart's
learning rate, and GRPO on rank 1, 8 and 32 adapters at 10× it), every point after the same full
cold-start SFT, run once per seed (the sweep's shared stages). Per point: held-out greedy pass@1 after
GRPO, its gain over the SFT start and its difference to full GRPO of the same seed, the GRPO step time
(after the first, compiling step) and the GRPO stage's train-state bytes by part (summary.json:
trainable params, optimizer state, reference, frozen base). The goal: rank 8 within 3 points of full.
`tpu`: `scripts/aot_compile.py` for Qwen2.5-7B GRPO with LoRA rank 32 (base in bfloat16) on v5e-16, as
configured and with 4 micro-batches per minibatch (`grad_accum_steps`, same math), the full-parameter
step on the same slice for contrast, and Qwen2.5-32B LoRA rank 32 on v5p-64: per-chip peak of the
sampler and the step, and whether each fits.
Each mode keeps the other's entry of the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "lora")
GIB, MIB = 2**30, 2**20
GOAL_POINTS = 3.0  # rank 8's held-out accuracy within this many points of full GRPO (mean over seeds)
STATE_PARTS = ("params", "opt_state", "ref_params", "base")

QWEN = "--config=configs/gsm8k_qwen2_5.py"
LORA32 = ("--config.grpo.lora=True", "--config.lora.rank=32", "--config.lora.base_dtype=bfloat16")
# (name, aot_compile.py arguments): the 7B and 32B meshes of docs/SCALING.md.
V5E16 = (QWEN, "--topology=v5e:4x4", "--model_preset=qwen2.5-7b", '--config.mesh="(1,16,1)"')
ACCUM4 = "--config.grpo.grad_accum_steps=4"  # 4 micro-batches per minibatch: the same updates, 1/4 the rows
# (name, aot_compile.py arguments): the 7B and 32B meshes of docs/SCALING.md.
TPU_CASES = (
    ("qwen2.5-7b lora r32 v5e-16", (*V5E16, *LORA32)),
    ("qwen2.5-7b lora r32 v5e-16 accum 4", (*V5E16, *LORA32, ACCUM4)),
    ("qwen2.5-7b full v5e-16", (*V5E16, "--programs=grpo_step")),
    ("qwen2.5-7b full v5e-16 accum 4", (*V5E16, ACCUM4, "--programs=grpo_step")),
    (
        "qwen2.5-32b lora r32 v5p-64",
        (QWEN, "--topology=v5p:4x4x4", "--model_preset=qwen2.5-32b", '--config.mesh="(1,16,4)"', *LORA32),
    ),
)


def _sweep_module():
    from grpo_jax.cli import sweep

    return sweep


def _machine() -> dict:
    import jax

    return {"machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}


# ------------------------------------------------------------------------------------------------
# The quickstart sweep
# ------------------------------------------------------------------------------------------------


def quickstart(config: str, root: str, seeds: list[str]) -> dict:
    """Run (or finish) the sweep into `root` and read every point × seed back."""
    command = [
        sys.executable,
        "scripts/sweep.py",
        f"--config={config}",
        f"--workdir={root}",
        f"--seeds={','.join(seeds)}",
    ]
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    with open(os.path.join(REPO, root, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the last (GRPO) stage's train state by part, from the run's summary.json
        run_dir = os.path.join(REPO, root, row["name"], f"seed{row['seed']}")
        with open(os.path.join(run_dir, "config.json")) as f:
            last = json.load(f)["stages"][-1]
        with open(os.path.join(run_dir, "summary.json")) as f:
            row["state_bytes"] = json.load(f)["stages"][last].get("train_state_bytes")
    return {
        "command": " ".join(["python", "benchmarks/report_lora.py", *sys.argv[1:]]),
        "sweep_command": " ".join(["python", *command[1:]]),
        "wall_s": round(time.time() - start, 1),
        **_machine(),
        "rows": rows,
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def quickstart_markdown(entry: dict) -> list[str]:
    sweep = _sweep_module()
    rows = entry["rows"]
    lines = [
        "## The quickstart: full GRPO vs GRPO on adapters",
        "",
        f"`{entry['command']}`, which runs `{entry['sweep_command']}` ({entry['machine']}, "
        f"{entry['cpus']} CPUs, jax {entry['jax']}; the sweep took {entry['wall_s'] / 60:.0f} min).",
        "",
        "Accuracies: held-out greedy pass@1 in %; `gain`: after GRPO minus the SFT start; `vs_full`: minus",
        "full GRPO of the same seed (same SFT start), in points; mean ± std over seeds.",
        "",
        sweep.results_table(rows).rstrip("\n"),
        "",
    ]
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    full = {r["seed"]: float(r["final_eval_accuracy"]) for r in by_name.get("full", [])}
    paired = [
        100.0 * (float(r["final_eval_accuracy"]) - full[r["seed"]])
        for r in by_name.get("rank8", [])
        if r["seed"] in full
    ]
    if paired:
        gap = _mean(paired)
        verdict = "met" if gap >= -GOAL_POINTS else "NOT met"
        lines += [
            f"**Goal (rank 8 within {GOAL_POINTS:.0f} points of full): {verdict}** — rank 8 minus full, "
            f"paired by seed: {', '.join(f'{p:+.1f}' for p in paired)} (mean {gap:+.1f}).",
            "",
        ]
    lines += [
        "Train state of the GRPO stage by part (MiB; summary.json's `train_state_bytes`):",
        "",
        "| point | " + " | ".join(STATE_PARTS) + " | total |",
        "|" + " --- |" * (len(STATE_PARTS) + 2),
    ]
    for name, runs in by_name.items():
        state = runs[0].get("state_bytes") or {}
        cells = [f"{state[p] / MIB:.2f}" if p in state else "—" for p in (*STATE_PARTS, "total")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------
# Ahead-of-time TPU compiles
# ------------------------------------------------------------------------------------------------


def tpu(done: list[dict], save) -> list[dict]:
    """Each case in its own process (a compile holds the CPU for minutes; one at a time). A case whose
    command is already in `done` (an earlier, interrupted --mode=tpu) is kept, not compiled again;
    `save(runs)` after each case."""
    runs, kept = [], {run["command"]: run for run in done}
    for name, args in TPU_CASES:
        shown = " ".join(["python", "scripts/aot_compile.py", *args])
        if shown in kept:
            runs.append(dict(kept[shown], name=name))
            continue
        out = f"{OUT}.aot.tmp.json"
        command = [
            sys.executable,
            "scripts/aot_compile.py",
            *(a.replace('"', "") for a in args),
            f"--out={out}",
        ]
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        with open(out) as f:
            report = json.load(f)
        os.remove(out)
        runs.append({"name": name, "command": shown, **report})
        save(runs)
    return runs


def tpu_markdown(runs: list[dict]) -> list[str]:
    lines = [
        "## Ahead of time: Qwen2.5 GRPO with LoRA on TPU slices",
        "",
        "Compiled on this CPU for compile-only TPU devices (libtpu; the TPU compiler decides what fits), as",
        "`scripts/aot_compile.py` does for `benchmarks/tpu_aot.md`: configs/gsm8k_qwen2_5.py (64 prompts ×",
        "G = 16, P = 320, L = 768, full remat, bf16 compute). `state` is the train state the step takes, per",
        "chip (LoRA: adapters, their Adam moments and the bf16 base; full: fp32 policy, moments and",
        "reference); a program's peak includes its arguments.",
        "",
        "| case | slice | mesh | state / chip | sampler peak / chip | step peak / chip | fits (HBM / chip) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        mesh = " × ".join(str(run["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        programs = run["programs"]
        peak = {name: f"{p['peak_bytes_per_device'] / GIB:.2f} GiB" for name, p in programs.items()}
        fits = all(p["fits"] for p in programs.values())
        hbm = run["hbm_bytes_per_device"] / GIB
        state = run["state_bytes_per_device"] / GIB
        verdict = "yes" if fits else "**no**"
        lines.append(
            f"| {run['name']} | {run['topology']} | {mesh} | {state:.2f} GiB | {peak.get('sampler', '—')} | "
            f"{peak.get('grpo_step', '—')} | {verdict} ({hbm:.2f} GiB) |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {run['name']}: `{run['command']}`" for run in runs]
    return lines + [""]


# ------------------------------------------------------------------------------------------------


def render(data: dict) -> str:
    lines = ["# LoRA: GRPO on adapters vs full fine-tuning", ""]
    lines += [
        "The reference is the frozen base (no second copy), Adam's moments are the adapters', and the base",
        "may be stored in bf16 (`config.lora`, docs/ARCHITECTURE.md). Numbers from the commands below; the",
        "JSON beside this file (`lora.json`) has every field.",
        "",
    ]
    if "quickstart" in data:
        lines += quickstart_markdown(data["quickstart"])
    if "tpu" in data:
        lines += tpu_markdown(data["tpu"])
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("quickstart", "tpu"), default=None)
    parser.add_argument("--render", action="store_true", help="only re-render OUT.md from OUT.json")
    parser.add_argument("--config", default="configs/lora.py", help="the sweep's config (:runlocal: smoke)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="workdirs/lora_sweep", help="the sweep directory")
    parser.add_argument("--out", default=OUT, help="output path without extension")
    args = parser.parse_args()
    if not args.render and args.mode is None:
        parser.error("give --mode=quickstart, --mode=tpu or --render")
    path = f"{args.out}.json"
    data = json.load(open(path)) if os.path.exists(path) else {}
    if args.mode == "quickstart":
        data["quickstart"] = quickstart(args.config, args.root, args.seeds.split(","))
    elif args.mode == "tpu":

        def save(runs):  # after every case, so an interrupted run keeps what it compiled
            with open(path, "w") as f:
                json.dump(dict(data, tpu=runs), f, indent=1)

        data["tpu"] = tpu(data.get("tpu", []), save)
    if args.mode is not None:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    with open(f"{args.out}.md", "w") as f:
        f.write(render(data))
    print(f"wrote {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
