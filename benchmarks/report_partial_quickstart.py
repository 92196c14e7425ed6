"""Report of a staleness ablation on the quickstart: partial rollouts (configs/ablations/partial_rollouts.py,
`--sweep=partial`) or pipelined rollouts k updates ahead (configs/ablations/off_policy.py,
`--sweep=off_policy`): held-out accuracy after SFT and after GRPO per point and seed, the reward's first
and last 10 steps, step time, the share of fill places and the staleness of the trained tokens.

    python scripts/sweep.py --config=configs/ablations/partial_rollouts.py --workdir=DIR --seeds=0,1,2
    python benchmarks/report_partial_quickstart.py --workdir=DIR [--sweep=off_policy] [--command="..."]

Reads DIR/<point>/seed<k>/{summary.json,metrics.jsonl}; writes benchmarks/partial_rollouts_quickstart.md
or benchmarks/off_policy_quickstart.md (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = {
    "off": "`configs/quickstart.py` as it is (the engine, whole rollouts, DAPO dynamic sampling with "
    "refill).",
    "whole": "`dynamic_sampling_refill=False` (whole rollouts, zero-variance groups weight 0, no refill): "
    "the baseline partial rollouts can be combined with.",
    "on": "whole + `engine.rollout_token_budget=10` (L/4 of 40), `engine.num_slots=512`, "
    "`engine.max_inflight_groups=128`, `algo.is_correction=token_tis` (C = 2).",
}


OFF_POLICY_POINTS = {
    f"k{k}": f"`grpo.off_policy_steps={k}`, co-located; every point without refill and with "
    "`algo.is_correction=token_tis` (C = 2)"
    for k in (0, 1, 2)
}
SWEEPS = {
    "partial": dict(
        points=POINTS,
        title="Partial rollouts on the quickstart: learning curves, 3 seeds",
        config="configs/ablations/partial_rollouts.py",
        out="partial_rollouts_quickstart.md",
    ),
    "off_policy": dict(
        points=OFF_POLICY_POINTS,
        title="Pipelined rollouts k updates ahead on the quickstart: learning curves, 3 seeds",
        config="configs/ablations/off_policy.py",
        out="off_policy_quickstart.md",
    ),
}


def run_row(folder: str) -> dict:
    summary = json.load(open(os.path.join(folder, "summary.json")))["stages"]
    lines = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    grpo = [x for x in lines if x["stage"] == "grpo"]
    rewards = [x["reward/mean"] for x in grpo]
    fill = [x.get("partial/fill_groups", 0.0) for x in grpo]
    complete = [x.get("partial/complete_groups", 0.0) for x in grpo]
    sft, final = summary["sft"]["final_eval_accuracy"], summary["grpo"]["final_eval_accuracy"]
    return {
        "sft": sft,
        "grpo": final,
        "gain": 100 * (final - sft),
        "reward_first": statistics.mean(rewards[:10]),
        "reward_last": statistics.mean(rewards[-10:]),
        "step_s": statistics.mean(x["step_time_s"] for x in grpo),
        "fill_share": sum(fill) / max(sum(fill) + sum(complete), 1.0),
        "staleness_mean": statistics.mean(x.get("staleness/mean", 0.0) for x in grpo),
        "staleness_max": max(x.get("staleness/max", 0.0) for x in grpo),
        "curve": [(e["step"], e["eval/accuracy"]) for e in summary["grpo"]["evals"]],
    }


def render(workdir: str, command: str, sweep: str = "partial") -> str:
    setting = SWEEPS[sweep]
    rows, gains = [], {}
    for point in setting["points"]:
        folder = os.path.join(workdir, point)
        if not os.path.isdir(folder):
            continue
        for seed_dir in sorted(os.listdir(folder)):
            path = os.path.join(folder, seed_dir)
            if not os.path.exists(os.path.join(path, "summary.json")):
                continue
            r = run_row(path)
            gains.setdefault(point, []).append(r["gain"])
            rows.append((point, seed_dir.removeprefix("seed"), r))
    lines = [
        f"# {setting['title']}",
        "",
        f"Made by `{command}`, reported by `python benchmarks/report_partial_quickstart.py "
        f"--workdir=DIR --sweep={sweep}`, on a 2-core CPU shared with other jobs (wall times are not "
        "comparable with benchmarks/quickstart.md).",
        "",
        *[f"- {name}: {text}" for name, text in setting["points"].items()],
        "",
        "Held-out greedy pass@1 (500 problems) after SFT and after 225 GRPO steps:",
        "",
        "| point | seed | SFT | GRPO | gain (points) | reward first 10 → last 10 steps | mean step s "
        "| fill share | staleness mean / max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point, seed, r in rows:
        lines.append(
            f"| {point} | {seed} | {100 * r['sft']:.1f}% | {100 * r['grpo']:.1f}% | {r['gain']:+.1f} | "
            f"{r['reward_first']:.3f} → {r['reward_last']:.3f} | {r['step_s']:.2f} | "
            f"{100 * r['fill_share']:.0f} % | {r['staleness_mean']:.2f} / {r['staleness_max']:.0f} |"
        )
    lines.append("")
    for point, values in gains.items():
        lines.append(f"Mean gain {point}: {statistics.mean(values):+.1f} points over {len(values)} seeds.")
    lines += ["", "Eval curves (global step: pass@1):", ""]
    for point, seed, r in rows:
        curve = ", ".join(f"{step}: {100 * acc:.1f}%" for step, acc in r["curve"])
        lines.append(f"- {point} seed {seed}: {curve}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the sweep's --workdir")
    parser.add_argument("--sweep", choices=tuple(SWEEPS), default="partial")
    parser.add_argument("--command", default="", help="the sweep's command (default: its config, 3 seeds)")
    parser.add_argument("--out", default="", help="default: benchmarks/<the sweep's file>.md")
    args = parser.parse_args(argv)
    setting = SWEEPS[args.sweep]
    command = (
        args.command or f"python scripts/sweep.py --config={setting['config']} --workdir=DIR --seeds=0,1,2"
    )
    text = render(args.workdir, command, args.sweep)
    with open(args.out or os.path.join(HERE, setting["out"]), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
