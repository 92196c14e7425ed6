"""Run the quickstart for several seeds, one after another, and write `benchmarks/quickstart.md` + `.json`.

    python benchmarks/report_quickstart.py --seeds=0,1,2 --root=workdirs/quickstart_seeds

Each seed runs `scripts/train.py --config=configs/quickstart.py --config.seed=S` in its own workdir
(wall time includes start-up and compilation). The report gives, per seed: held-out greedy pass@1
after the cold-start SFT and after GRPO, the reward curve (mean of the first and last 10 GRPO steps),
the largest KL, and the wall time.
"""

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_ROOT = flags.DEFINE_string("root", "workdirs/quickstart_seeds", "Parent folder of the per-seed workdirs.")
_OUT = flags.DEFINE_string("out", "benchmarks/quickstart", "Output path without extension (.md and .json).")
_CONFIG = flags.DEFINE_string("config", "configs/quickstart.py", "Config file to run.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed: int) -> dict:
    workdir = os.path.join(_ROOT.value, f"seed{seed}")
    if os.path.exists(os.path.join(workdir, "summary.json")):
        raise SystemExit(f"error: {workdir} already holds a finished run; remove it or pick another --root")
    command = [
        sys.executable,
        "scripts/train.py",
        f"--config={_CONFIG.value}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        "--config.progress_bar=False",
    ]
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    with open(os.path.join(REPO, workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(REPO, workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    grpo = [line for line in lines if line["stage"] == "grpo"]
    rewards = [line["reward/mean"] for line in grpo]
    return {
        "seed": seed,
        "sft_accuracy": summary["stages"]["sft"]["final_eval_accuracy"],
        "grpo_accuracy": summary["stages"]["grpo"]["final_eval_accuracy"],
        "grpo_evals": [(e["step"], e["eval/accuracy"]) for e in summary["stages"]["grpo"]["evals"]],
        "reward_first10": sum(rewards[:10]) / len(rewards[:10]),
        "reward_last10": sum(rewards[-10:]) / len(rewards[-10:]),
        "kl_max": max(line["kl"] for line in grpo),
        "kl_last": grpo[-1]["kl"],
        "wall_time_s": wall,
        "command": " ".join(command[1:]),
    }


def main(argv):
    del argv
    results = [run_seed(int(s)) for s in _SEEDS.value]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    try:
        import jax

        meta["jax"] = jax.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(os.path.join(REPO, _OUT.value)), exist_ok=True)
    with open(os.path.join(REPO, _OUT.value + ".json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    rows = [
        f"| {r['seed']} | {100 * r['sft_accuracy']:.1f}% | {100 * r['grpo_accuracy']:.1f}% | "
        f"{100 * (r['grpo_accuracy'] - r['sft_accuracy']):+.1f} | {r['reward_first10']:.3f} → "
        f"{r['reward_last10']:.3f} | {r['kl_max']:.3f} | {r['wall_time_s']:.0f} s |"
        for r in results
    ]
    gains = [r["grpo_accuracy"] - r["sft_accuracy"] for r in results]
    text = "\n".join(
        [
            "# Quickstart: cold-start SFT, then GRPO",
            "",
            "Held-out greedy pass@1 on 500 problems of the test split (never trained on), after the SFT",
            "stage and after the GRPO stage, for each seed. Made by:",
            "",
            "```bash",
            f"python benchmarks/report_quickstart.py --seeds={','.join(_SEEDS.value)} --root={_ROOT.value}",
            "```",
            "",
            "which runs, one seed at a time, "
            f"`python scripts/train.py --config={_CONFIG.value} --workdir=ROOT/seedS --config.seed=S`.",
            f"Machine: {meta['machine']}; jax {meta.get('jax', '?')}. "
            "Wall time includes start-up and compilation.",
            "",
            "| seed | SFT pass@1 | GRPO pass@1 | gain (points) | GRPO reward, first 10 → last 10 steps "
            "| max KL | wall time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Mean gain: {100 * sum(gains) / len(gains):+.1f} points; smallest: {100 * min(gains):+.1f}.",
            "",
            "GRPO eval curve per seed (step, pass@1): "
            + "; ".join(
                f"seed {r['seed']}: " + ", ".join(f"{s}: {100 * a:.1f}%" for s, a in r["grpo_evals"])
                for r in results
            ),
            "",
        ]
    )
    with open(os.path.join(REPO, _OUT.value + ".md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
