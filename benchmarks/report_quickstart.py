"""Run the quickstart for several seeds, one after another, and write `benchmarks/quickstart.md` + `.json`.

    python benchmarks/report_quickstart.py --seeds=0,1,2,3,4 --root=workdirs/quickstart_seeds

Each seed runs `scripts/train.py --config=configs/quickstart.py --config.seed=S` in its own workdir
(wall time includes start-up and compilation). The report gives, per seed: held-out greedy pass@1
after the cold-start SFT and after GRPO, the reward curve (mean of the first and last 10 GRPO steps),
the largest KL, the wall time and how busy the machine was (load average, the CPU share the run got);
then the median and smallest gain and whether the quickstart's goal (`GOAL`) is met.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the quickstart promises a newcomer, whatever the seed: GRPO adds at least this many points of
# held-out greedy pass@1 to every seed's cold start, at least `median_gain` on the median seed, and a run
# takes at most `max_wall_s` on a 2-core CPU.
GOAL = {"min_gain": 25.0, "median_gain": 30.0, "max_wall_s": 300.0}


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_seed(seed: int, root: str, config: str) -> dict:
    """Train one seed in ROOT/seed<S> and read its numbers back."""
    workdir = os.path.join(root, f"seed{seed}")
    if os.path.exists(os.path.join(workdir, "summary.json")):
        raise SystemExit(f"error: {workdir} already holds a finished run; remove it or pick another --root")
    command = [
        sys.executable,
        "scripts/train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        "--config.progress_bar=False",
    ]
    load_start, cpu_start = os.getloadavg()[0], _child_cpu_seconds()
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    cpu_share = (_child_cpu_seconds() - cpu_start) / wall / os.cpu_count()
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
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "cpu_share": cpu_share,
        "command": " ".join(command[1:]),
    }


def goal_summary(results: list[dict], goal: dict = GOAL) -> dict:
    """Gains in points (GRPO pass@1 minus SFT pass@1, x100), their median and minimum, the longest wall
    time, and whether each part of `goal` holds."""
    gains = [100 * (r["grpo_accuracy"] - r["sft_accuracy"]) for r in results]
    walls = [r["wall_time_s"] for r in results]
    summary = {
        "gains": gains,
        "median_gain": statistics.median(gains),
        "min_gain": min(gains),
        "mean_gain": statistics.fmean(gains),
        "max_wall_s": max(walls),
        "goal": dict(goal),
    }
    summary["met"] = {
        "min_gain": summary["min_gain"] >= goal["min_gain"],
        "median_gain": summary["median_gain"] >= goal["median_gain"],
        "max_wall_s": summary["max_wall_s"] <= goal["max_wall_s"],
    }
    summary["goal_met"] = all(summary["met"].values())
    return summary


def _verdict(summary: dict) -> str:
    goal, met = summary["goal"], summary["met"]
    parts = [
        f"every seed gains >= +{goal['min_gain']:.0f} (smallest {summary['min_gain']:+.1f}): "
        + ("yes" if met["min_gain"] else "NO"),
        f"median gain >= +{goal['median_gain']:.0f} ({summary['median_gain']:+.1f}): "
        + ("yes" if met["median_gain"] else "NO"),
        f"every run <= {goal['max_wall_s']:.0f} s (longest {summary['max_wall_s']:.0f} s): "
        + ("yes" if met["max_wall_s"] else "NO"),
    ]
    head = "**Goal met.**" if summary["goal_met"] else "**Goal NOT met.**"
    return head + " " + "; ".join(parts) + "."


def _load_note(results: list[dict]) -> str:
    cores = os.cpu_count() or 1
    busiest = max(max(r["load_average_start"], r["load_average_end"]) for r in results)
    if busiest <= cores:
        return f"The machine was quiet (1-minute load average at most {busiest:.1f} on {cores} cores)."
    return (
        f"The machine was shared: the 1-minute load average reached {busiest:.1f} on {cores} cores, so "
        "the wall times are longer than on a quiet machine (the CPU share column is the fraction of the "
        "cores a run got: about 1 when it had them to itself)."
    )


def render(results: list[dict], summary: dict, meta: dict, *, root: str, config: str) -> str:
    """The markdown report."""
    seeds = ",".join(str(r["seed"]) for r in results)
    rows = [
        f"| {r['seed']} | {100 * r['sft_accuracy']:.1f}% | {100 * r['grpo_accuracy']:.1f}% | "
        f"{gain:+.1f} | {r['reward_first10']:.3f} → {r['reward_last10']:.3f} | {r['kl_max']:.3f} | "
        f"{r['wall_time_s']:.0f} s | {r['load_average_start']:.1f} → {r['load_average_end']:.1f} | "
        f"{r['cpu_share']:.2f} |"
        for r, gain in zip(results, summary["gains"], strict=True)
    ]
    return "\n".join(
        [
            "# Quickstart: cold-start SFT, then GRPO",
            "",
            "Held-out greedy pass@1 on 500 problems of the test split (never trained on), after the SFT",
            "stage and after the GRPO stage, for each seed. Made by:",
            "",
            "```bash",
            f"python benchmarks/report_quickstart.py --seeds={seeds} --root={root}",
            "```",
            "",
            "which runs, one seed at a time, "
            f"`python scripts/train.py --config={config} --workdir=ROOT/seedS --config.seed=S`.",
            f"Machine: {meta['machine']}; jax {meta.get('jax', '?')}. "
            "Wall time includes start-up and compilation.",
            "",
            "| seed | SFT pass@1 | GRPO pass@1 | gain (points) | GRPO reward, first 10 → last 10 steps "
            "| max KL | wall time | load average, start → end | CPU share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Median gain: {summary['median_gain']:+.1f} points; smallest: {summary['min_gain']:+.1f}; "
            f"mean: {summary['mean_gain']:+.1f}.",
            "",
            _verdict(summary),
            "",
            _load_note(results),
            "",
            "GRPO eval curve per seed (step, pass@1): "
            + "; ".join(
                f"seed {r['seed']}: " + ", ".join(f"{s}: {100 * a:.1f}%" for s, a in r["grpo_evals"])
                for r in results
            ),
            "",
        ]
    )


def main(argv):
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    results = [run_seed(int(s), FLAGS.root, FLAGS.config) for s in FLAGS.seeds]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    try:
        import jax

        meta["jax"] = jax.__version__
    except ImportError:
        pass
    summary = goal_summary(results)
    out = os.path.join(REPO, FLAGS.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=2)
    text = render(results, summary, meta, root=FLAGS.root, config=FLAGS.config)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds to run.")
    flags.DEFINE_string("root", "workdirs/quickstart_seeds", "Parent folder of the per-seed workdirs.")
    flags.DEFINE_string("out", "benchmarks/quickstart", "Output path without extension (.md and .json).")
    flags.DEFINE_string("config", "configs/quickstart.py", "Config file to run.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
