"""Run a multi-stage config for several seeds and report every stage: `OUT.md`, `OUT.json`, `OUT.png`.

    python benchmarks/report_stages.py --config=configs/compare_rl.py --seeds=0,1,2 \
        --root=workdirs/compare_rl --out=benchmarks/grpo_vs_ppo
    python benchmarks/report_stages.py --config=configs/r1_pipeline.py --seeds=0 \
        --root=workdirs/r1_pipeline --out=benchmarks/r1_pipeline

Each seed runs `scripts/train.py --config=CONFIG --workdir=ROOT/seedS --config.seed=S` (a finished
workdir is reused, an unfinished one resumed). Per stage and seed the report gives the final held-out
greedy pass@1 (or the reward model's held-out pair accuracy), the eval curve by stage-local step, the
stage's training time (sum of `step_time_s`) plus its eval time, and the mean step time; the plot shows
held-out accuracy against steps and against training time, mean and range over seeds, for every stage
that evaluates the policy.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/compare_rl.py", "Config file to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_ROOT = flags.DEFINE_string("root", "workdirs/compare_rl", "Parent folder of the per-seed workdirs.")
_OUT = flags.DEFINE_string("out", "benchmarks/grpo_vs_ppo", "Output path without extension.")
_TITLE = flags.DEFINE_string("title", "", "Report title (default: the config's name).")
_APPEND = flags.DEFINE_list("append", [], "Markdown files appended to the report (notes, step benchmarks).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(seed: int) -> list[str]:
    return [
        sys.executable,
        "scripts/train.py",
        f"--config={_CONFIG.value}",
        f"--workdir={os.path.join(_ROOT.value, f'seed{seed}')}",
        f"--config.seed={seed}",
        "--config.progress_bar=False",
    ]


def stage_report(workdir: str) -> dict:
    """{stage name: numbers} from a finished workdir's config.json, summary.json and metrics.jsonl."""
    read = lambda name: json.load(open(os.path.join(workdir, name)))
    config, summary = read("config.json"), read("summary.json")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    report, offset = {}, 0
    for index, name in enumerate(config["stages"]):
        steps = config[name]["steps"]
        train = [x for x in lines if x["stage"] != "eval" and offset < x["step"] <= offset + steps]
        evals = [x for x in lines if x["stage"] == "eval" and x.get("train_stage") == name]
        stage = summary["stages"][name]
        entry = {
            "kind": stage["kind"],
            "steps": steps,
            "final_accuracy": stage["final_eval_accuracy"],
            "best_accuracy": stage["best_eval_accuracy"],
            "evals": [(x["step"] - offset, x["eval/accuracy"]) for x in evals],
            "train_time_s": sum(x.get("step_time_s", 0.0) for x in train),
            "eval_time_s": sum(x.get("eval/time_s", 0.0) for x in evals),
            "mean_step_time_s": sum(x.get("step_time_s", 0.0) for x in train) / max(len(train), 1),
        }
        source = config[name].get("init_from", "previous")
        source = config["stages"][index - 1] if source == "previous" and index else source
        if source in report and report[source]["final_accuracy"] is not None:
            entry["start_accuracy"] = report[source]["final_accuracy"]  # the curve's point at step 0
        rewards = [x["reward/mean"] for x in train if "reward/mean" in x]
        if rewards:
            entry["reward_first10"] = sum(rewards[:10]) / len(rewards[:10])
            entry["reward_last10"] = sum(rewards[-10:]) / len(rewards[-10:])
        for key in ("heldout_pair_accuracy", "rejection_sampling"):
            if key in stage:
                entry[key] = stage[key]
        report[name] = entry
        offset += steps
    return report


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, e in results[0]["stages"].items() if e["evals"] and e["kind"] != "sft"]
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        curves = [
            ([(0, r["stages"][name]["start_accuracy"])] if "start_accuracy" in r["stages"][name] else [])
            + r["stages"][name]["evals"]
            for r in results
        ]
        steps = [s for s, _ in curves[0]]
        acc = np.array([[a for _, a in c] for c in curves if len(c) == len(steps)]) * 100
        seconds = np.array(
            [
                [s * r["stages"][name]["mean_step_time_s"] for s, _ in curve]
                for r, curve in zip(results, curves, strict=True)
                if len(curve) == len(steps)
            ]
        )
        for axis, x in ((by_step, np.array(steps)), (by_time, seconds.mean(axis=0))):
            axis.plot(x, acc.mean(axis=0), marker="o", label=name)
            axis.fill_between(x, acc.min(axis=0), acc.max(axis=0), alpha=0.2)
    by_step.set(xlabel="RL steps", ylabel="held-out greedy pass@1 (%)")
    by_time.set(xlabel="training time (s, excluding evals)", ylabel="held-out greedy pass@1 (%)")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"mean and range over {len(results)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    results = []
    for seed in map(int, _SEEDS.value):
        workdir = os.path.join(REPO, _ROOT.value, f"seed{seed}")
        if not os.path.exists(os.path.join(workdir, "summary.json")):
            subprocess.run(train_command(seed), cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        results.append({"seed": seed, "stages": stage_report(workdir)})
    import jax

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__}
    out = os.path.join(REPO, _OUT.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "config": _CONFIG.value, "results": results}, f, indent=2)
    plot(results, out + ".png")

    def accuracy(entry):
        value = entry["final_accuracy"]
        if value is None and "heldout_pair_accuracy" in entry:
            return f"pairs {100 * entry['heldout_pair_accuracy']:.1f}%"
        return "—" if value is None else f"{100 * value:.1f}%"

    names = list(results[0]["stages"])
    rows = [
        f"| {r['seed']} | {name} ({e['kind']}) | {e['steps']} | {accuracy(e)} | "
        + (f"{e['reward_first10']:.3f} → {e['reward_last10']:.3f}" if "reward_first10" in e else "—")
        + f" | {e['mean_step_time_s']:.3f} s | {e['train_time_s']:.0f} s + {e['eval_time_s']:.0f} s |"
        for r in results
        for name, e in r["stages"].items()
    ]
    means = []
    for name in names:
        finals = [r["stages"][name]["final_accuracy"] for r in results]
        if all(v is not None for v in finals):
            means.append(f"{name} {100 * sum(finals) / len(finals):.1f}%")
    text = "\n".join(
        [
            f"# {_TITLE.value or os.path.basename(_CONFIG.value)}",
            "",
            "Made by:",
            "",
            "```bash",
            f"python benchmarks/report_stages.py --config={_CONFIG.value} --seeds={','.join(_SEEDS.value)} "
            f"--root={_ROOT.value} --out={_OUT.value}"
            + (f" --append={','.join(_APPEND.value)}" if _APPEND.value else ""),
            "```",
            "",
            f"which runs `{' '.join(train_command(0)[1:]).replace('seed0', 'seedS').replace('=0', '=S')}` "
            f"per seed. Machine: {meta['machine']}; jax {meta['jax']}. Accuracy: held-out greedy pass@1 "
            "on the test split after the stage (a reward model: held-out pair accuracy). Time: the "
            "stage's training steps (sum of `step_time_s`, compilation included) + its evals.",
            "",
            "| seed | stage | steps | final accuracy | reward, first 10 → last 10 steps | mean step time "
            "| train + eval time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Mean final accuracy over seeds: {'; '.join(means)}.",
            "",
            "Eval curves (stage-local step: pass@1): "
            + "; ".join(
                f"seed {r['seed']} {name}: " + ", ".join(f"{s}: {100 * a:.1f}%" for s, a in e["evals"])
                for r in results
                for name, e in r["stages"].items()
                if e["evals"]
            ),
            "",
            f"![curves]({os.path.basename(out)}.png)",
            "",
        ]
    )
    for path in _APPEND.value:
        with open(os.path.join(REPO, path)) as f:
            text += "\n" + f.read()
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
