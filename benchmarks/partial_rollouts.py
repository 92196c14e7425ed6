"""Partial rollouts against whole rollouts on the long-tailed workload: rollout seconds per training step
at a token budget of L/4 (issue 20, "Partial rollouts", Measured).

    python benchmarks/partial_rollouts.py                  # B = 8, G = 8, P = 128, L = 1024, S = 64, L/4
    python benchmarks/partial_rollouts.py --budget=128 --slots=16

Workload: `benchmarks/rollout_engine.py`'s `long_tailed` (its model and sizes; lm_head = 0, so every
next token is uniform and k stop ids make lengths exactly geometric with mean about L/5, capped at L).
Each step takes fresh prompts (random tokens seeded by the batch's index), the same stream for both
systems. The params never change (this times the rollout only), but the policy version still counts the
steps, so the staleness of what the partial system hands out is measured.

Systems, each with S decode slots (`--slots`, default N = B·G: `config.engine.num_slots = 0`):
- `whole`: `grpo_jax.rollout.generate_with_stats` on the step's B prompts: a step waits for its longest
  sample (today's `config.sampler = "engine"`).
- `partial`: `grpo_jax.rollout.partial.PartialRollouts` with budget `--budget` (default L/4) and Q =
  `--max_groups` groups in flight (default 4B, as `config.engine.max_inflight_groups = 0`): per step,
  prompt batches are enqueued while a whole batch of group entries is free, then at most `budget`
  decode iterations run and B group places are handed out (complete groups oldest first; places
  without one are `fill`, trained at weight 0), exactly what the `grpo` stage does with
  `config.engine.rollout_token_budget`.

`--warmup` untimed steps of each (compilation; the partial pipeline fills), then `--steps` timed steps
alternated (whole, partial, whole, ...). Per system: median and mean seconds per step, complete groups
per step, groups/s and useful tokens/s (tokens of complete groups handed out, over the timed steps' total
time), the fill share, decode iterations per step, and the staleness of handed-out tokens (steps
between the version that drew a token and the step that hands it out). The GRPO update after each step
(the same B·G rows for both) is not included.

Ends with one JSON line; writes `benchmarks/partial_rollouts.json` and `.md` unless `--no_write`.
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

import jax
import numpy as np

from grpo_jax import rollout
from grpo_jax.rollout.partial import PartialRollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "partial_rollouts")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import rollout_engine  # noqa: E402  (the workload)


def prompts(w: dict, index: int) -> dict:
    """Prompt batch `index` of the stream: B prompts of P random tokens."""
    rng = np.random.default_rng(1000 + index)
    shape = (w["prompts"], w["prompt_len"])
    return {
        "prompt_tokens": rng.integers(2, w["model"].vocab_size, shape).astype(np.int32),
        "prompt_mask": np.ones(shape, np.int32),
    }


def sampling_args(w: dict) -> dict:
    return dict(
        num_samples=w["num_samples"],
        max_new_tokens=w["max_new_tokens"],
        temperature=w["temperature"],
        eos_id=w["stop_ids"][0],
        stop_ids=w["stop_ids"][1:],
        min_new_tokens=w["min_new_tokens"],
    )


class Whole:
    def __init__(self, w, args):
        self.w, self.args, self.step_index = w, args, 0

    def step(self) -> dict:
        w, i = self.w, self.step_index
        batch = prompts(w, i)
        out, stats = rollout.generate_with_stats(
            w["model"],
            w["params"],
            batch["prompt_tokens"],
            batch["prompt_mask"],
            jax.random.fold_in(jax.random.key(self.args.seed), i),
            num_slots=self.args.slots,
            page_size=self.args.page_size,
            **sampling_args(w),
        )
        mask, iterations = jax.device_get((out.mask, stats.iterations))
        self.step_index += 1
        return dict(groups=w["prompts"], fill=0, tokens=int(mask.sum()), iterations=int(iterations), lags=[])


class Partial:
    def __init__(self, w, args):
        self.w, self.args, self.step_index, self.batches = w, args, 0, 0
        self.rollouts = PartialRollouts(
            w["model"],
            prompts_per_step=w["prompts"],
            max_groups=args.max_groups,
            num_slots=args.slots,
            budget=args.budget,
            page_size=args.page_size,
            prompt_len=w["prompt_len"],
            **sampling_args(w),
        )
        self.state = self.rollouts.init()

    def step(self) -> dict:
        w, r = self.w, self.rollouts
        while r.room(self.state) >= w["prompts"]:
            rng = jax.random.fold_in(jax.random.key(self.args.seed), self.batches)
            self.state = r.enqueue(self.state, w["params"], prompts(w, self.batches), rng, self.step_index)
            self.batches += 1
        self.state, out = r.step(self.state, w["params"], self.step_index)
        mask, version, fill, stats = jax.device_get((out.rollout.mask, out.version, out.fill, out.stats))
        lags = (self.step_index - version)[mask > 0]
        self.step_index += 1
        return dict(
            groups=int((~fill).sum()),
            fill=int(fill.sum()),
            tokens=int(mask.sum()),
            iterations=int(stats["decode_iterations"]),
            lags=lags.tolist(),
        )


def run(args, command: str) -> dict:
    w = rollout_engine.build(args)
    n = w["prompts"] * w["num_samples"]
    args.slots = min(args.slots or n, n)
    args.budget = args.budget or w["max_new_tokens"] // 4
    args.max_groups = args.max_groups or 4 * w["prompts"]
    systems = {"whole": Whole(w, args), "partial": Partial(w, args)}
    log = {name: [] for name in systems}
    for name, system in systems.items():
        for _ in range(args.warmup):
            start = time.perf_counter()
            system.step()
            print(f"{name} warm-up step {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for i in range(args.steps):  # alternated
        for name, system in systems.items():
            start = time.perf_counter()
            record = system.step()
            record["seconds"] = time.perf_counter() - start
            log[name].append(record)
            print(f"{name} step {i}: {record['seconds']:.1f} s, {record['groups']} groups", file=sys.stderr)
    results = {}
    for name, records in log.items():
        seconds = [r["seconds"] for r in records]
        lags = np.asarray([lag for r in records for lag in r["lags"]], np.float64)
        total = sum(seconds)
        results[name] = dict(
            median_step_s=statistics.median(seconds),
            mean_step_s=total / len(seconds),
            groups_per_step=sum(r["groups"] for r in records) / len(records),
            fill_share=sum(r["fill"] for r in records) / (len(records) * w["prompts"]),
            groups_per_s=sum(r["groups"] for r in records) / total,
            useful_tokens_per_s=sum(r["tokens"] for r in records) / total,
            decode_iterations_per_step=sum(r["iterations"] for r in records) / len(records),
            staleness_mean=float(lags.mean()) if lags.size else 0.0,
            staleness_max=int(lags.max()) if lags.size else 0,
            steps=records,
        )
    whole = results["whole"]
    for r in results.values():
        r["step_time_vs_whole"] = whole["median_step_s"] / r["median_step_s"]
        r["groups_per_s_vs_whole"] = r["groups_per_s"] / whole["groups_per_s"]
    return dict(
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{os.cpu_count()} CPU cores, {jax.default_backend()}, jax {jax.__version__}",
        load_average_at_start=os.getloadavg()[0],
        workload=dict(
            prompts=w["prompts"],
            num_samples=w["num_samples"],
            prompt_len=w["prompt_len"],
            max_new_tokens=w["max_new_tokens"],
            slots=args.slots,
            budget=args.budget,
            max_inflight_groups=args.max_groups,
            page_size=args.page_size,
            method=w["method"],
        ),
        warmup=args.warmup,
        results=results,
    )


def render(report: dict) -> str:
    w = report["workload"]
    lines = [
        "# Partial rollouts vs whole rollouts: rollout seconds per training step",
        "",
        "`benchmarks/partial_rollouts.py` (its docstring has the method).",
        "",
        f"Made by `{report['command']}` ({report['date']}; {report['machine']}; load average at the start "
        f"{report['load_average_at_start']:.2f}).",
        "",
        f"B = {w['prompts']} prompts x G = {w['num_samples']}, P = {w['prompt_len']}, "
        f"L = {w['max_new_tokens']}, S = {w['slots']} slots, page size {w['page_size']}; partial: budget "
        f"{w['budget']} decode iterations per step, {w['max_inflight_groups']} groups in flight. "
        f"{report['warmup']} untimed steps each, then {len(report['results']['whole']['steps'])} timed "
        f"steps alternated. Lengths: {w['method']}.",
        "",
        "| system | median s / step | mean s / step | step time vs whole | complete groups / step "
        "| fill share | groups/s | vs whole | useful tokens/s | decode iterations / step "
        "| staleness mean / max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['median_step_s']:.2f} | {r['mean_step_s']:.2f} | {r['step_time_vs_whole']:.2f}x "
            f"| {r['groups_per_step']:.2f} | {100 * r['fill_share']:.0f} % | {r['groups_per_s']:.3f} "
            f"| {r['groups_per_s_vs_whole']:.2f}x | {r['useful_tokens_per_s']:.0f} "
            f"| {r['decode_iterations_per_step']:.0f} | {r['staleness_mean']:.2f} / {r['staleness_max']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = rollout_engine.DEFAULTS["long_tailed"]
    for name in ("prompts", "num_samples", "prompt_len", "max_new_tokens", "hidden_size", "num_layers"):
        parser.add_argument(f"--{name}", type=int, default=defaults[name])
    for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "page_size"):
        parser.add_argument(f"--{name}", type=int, default=defaults[name])
    parser.add_argument("--mean_len", type=float, default=0.0, help="mean length (0: L / 5)")
    parser.add_argument("--slots", type=int, default=0, help="S for both systems (0: N = B·G)")
    parser.add_argument("--budget", type=int, default=0, help="partial: decode iterations per step (0: L/4)")
    parser.add_argument("--max_groups", type=int, default=0, help="partial: groups in flight (0: 4B)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps of each system")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args(argv)
    args.workload = "long_tailed"
    command = "python benchmarks/partial_rollouts.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    report = run(args, command.strip())
    if not args.no_write:
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(render(report))
    line = {name: {k: v for k, v in r.items() if k != "steps"} for name, r in report["results"].items()}
    print(json.dumps(line))
    return report


if __name__ == "__main__":
    main()
