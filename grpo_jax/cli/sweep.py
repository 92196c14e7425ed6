"""Ablation sweeps: every point of a config's `get_sweep()` × every seed, each an ordinary training run.

    python scripts/sweep.py --config=configs/ablations/kl_coef.py --workdir=workdirs/kl_coef --seeds=0,1,2
    python scripts/sweep.py --config=configs/ablations/kl_coef.py:runlocal --workdir=/tmp/kl --point=1

A config file may define `get_sweep(arg=None)` next to `get_config(arg=None)` (big_vision style): a list of
override dicts with dotted keys into the config, e.g. `[{"grpo.algo.kl_coef": 0.0}, ...]`. An optional
`"_name"` entry names the point (default: the overrides, `kl_coef=0.0`). Each point × seed runs
`scripts/train.py --config=CONFIG --workdir=DIR/<point>/seed<k> --config.<key>=<value> ... --config.seed=k`
as a subprocess, one after another, so each is a resumable workdir (its log: `train.log` beside it). A run
whose `summary.json` exists is skipped; an interrupted one resumes. `--point=I` (or `I,J`) runs only those
points, so a job array can run the points in parallel; every invocation then (re)writes

- `DIR/results.csv`: one row per finished point × seed: the overrides, the held-out eval accuracy the
  last stage started from (the previous stage's final one), the final and best held-out eval accuracy of
  the config's last stage, the mean reward over the last 10 % of that stage's steps, its mean
  KL, completion length, share of zero-variance groups, generation rounds (refill; else empty), step
  time (after the first, compiling step), the bytes of its train state (summary.json's
  `train_state_bytes`: params or LoRA adapters, optimizer state, reference, frozen base) and the run's
  wall time (of its last process, when resumed);
- `DIR/results.png`: eval accuracy and reward curves per point, mean and range over the seeds, and the
  eval accuracy minus point 0's of the same seed (paired);
- `DIR/results.md`: one line per point, each column's mean ± standard deviation over its seeds, plus the
  gain over the start and the paired difference to point 0 (same seed, same start) in accuracy points.

Shared stages: when every override key lies under a later stage's section (`grpo.algo.kl_coef`), the
leading stages no point touches (the quickstart's cold-start `sft`) are the same for every point. They run
once per seed into `DIR/_shared/seed<k>` (`--config.stages=(...)`; a `lora.*` key touches only the stages
on adapters), and each point's workdir starts as a
copy of that one, so its run resumes after them exactly as an interrupted run would (resume is exact:
same metrics as a run from scratch). Such a point's `wall_time_s` is then that of its own stages.
`--noshare_stages` runs every point from scratch.

A key that the config does not have, or a value of the wrong type, fails before any run with one line.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "Config file with get_config() and get_sweep(), [:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: DIR/<point>/seed<k>, results.csv/png.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds to run for every point.")
_POINT = flags.DEFINE_list("point", [], "Run only these point indices (0-based; default: all).")
_SHARE = flags.DEFINE_bool(
    "share_stages", True, "Run the leading stages no point changes once per seed (DIR/_shared)."
)
flags.mark_flags_as_required(["config", "workdir"])

NAME_KEY = "_name"  # an override dict's optional display name; not a config key
SHARED = "_shared"  # DIR/_shared/seed<k>: the stages every point shares, run once per seed
# What a point's workdir does not take from the shared run: its own config, log, summary and plots.
NOT_COPIED = ("summary.json", "config.json", "train.log", "curves.png", "tensorboard")
COLUMNS = (
    "start_eval_accuracy",
    "final_eval_accuracy",
    "best_eval_accuracy",
    "reward_last10pct",
    "kl_mean",
    "completion_len_mean",
    "zero_variance_frac",
    "refill_rounds",
    "step_time_s",
    "train_state_bytes",
    "wall_time_s",
)


# Columns kept in bytes in results.csv and shown in MiB in results.md, under these names.
MIB_COLUMNS = {"train_state_bytes": "train_state_MiB"}


class SweepError(ValueError):
    """A sweep that cannot start (bad config file, key or value); the message is one line."""


def load_sweep(config_arg: str):
    """(config, points) from `path[:arg]`: `get_config(arg)` and `get_sweep(arg)` of the file."""
    path, _, arg = config_arg.partition(":")
    arg = arg or None
    if not os.path.isfile(path):
        raise SweepError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("sweep_config", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"--config: {path} defines no get_sweep(arg=None)")
    config, points = module.get_config(arg), module.get_sweep(arg)
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"--config: {path}: get_sweep({arg!r}) must return a non-empty list of dicts")
    return config, [dict(p) for p in points]


def _format_value(value) -> str:
    return str(value)


def point_name(point: dict) -> str:
    """A folder name for the point: its `_name`, else `last_key=value,...` from the overrides."""
    if NAME_KEY in point:
        name = str(point[NAME_KEY])
    else:
        name = ",".join(f"{k.split('.')[-1]}={_format_value(v)}" for k, v in point.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def overrides(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != NAME_KEY}


def apply_point(config, point: dict, index: int = 0):
    """A copy of `config` with the point's overrides; SweepError naming the point and key if one is bad."""
    config = copy.deepcopy(config)
    where = f"point {index} ({point_name(point)})"
    for key, value in overrides(point).items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not hasattr(node, "keys") or part not in node:
                raise SweepError(
                    f"{where}: the config has no key {'.'.join(parents[: i + 1])!r} (in {key!r})"
                )
            node = node[part]
        if not hasattr(node, "keys") or leaf not in node:
            raise SweepError(f"{where}: the config has no key {key!r}")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as error:
            raise SweepError(
                f"{where}: bad value {value!r} for {key!r}: {' '.join(str(error).split())}"
            ) from None
    _check_algo(config, where)
    return config


def _check_algo(config, where: str) -> None:
    """Every GRPO stage's algo section must still make a valid GRPOConfig (e.g. G >= 2)."""
    from grpo_jax.algorithms.config import GRPOConfig

    for stage in config.get("stages", ()):
        section = config.get(stage)
        if stage.startswith("grpo") and section is not None and "algo" in section:
            try:
                GRPOConfig.from_dict(section.algo)
            except ValueError as error:
                raise SweepError(f"{where}: {' '.join(str(error).split())}") from None


def shared_stages(config, points: list[dict]) -> list[str]:
    """The leading stages of `config.stages` that no point's overrides touch, when every override key
    lies under some stage's section (`grpo.algo.kl_coef`); [] when one does not (`model.hidden_size`,
    `seed`: then every stage may differ). The last stage is never shared: a point must run something."""
    stages = list(config.get("stages", ()))
    touched = set()
    for point in points:
        for key in overrides(point):
            head = key.split(".")[0]
            if head == "lora" and "." in key:  # config.lora is read only by the stages on adapters
                touched.update(lora_stages(config, points))
                continue
            if head not in stages or "." not in key:
                return []
            touched.add(head)
    shared = []
    for name in stages[:-1]:
        if name in touched:
            break
        shared.append(name)
    return shared


def lora_stages(config, points: list[dict]) -> set[str]:
    """The stages that train LoRA adapters in the config or in any point (`<stage>.lora` True)."""
    stages = config.get("stages", ())
    on = {name for name in stages if config[name].get("lora", False)}
    return on | {
        k.split(".")[0] for p in points for k, v in overrides(p).items() if k.endswith(".lora") and v
    }


def start_from_shared(shared_dir: str, run_dir: str) -> bool:
    """Make a fresh `run_dir` a copy of the finished shared run (checkpoints, stage results, metrics,
    tokenizer), so the point's `train.py` resumes after the shared stages. An already started run_dir
    (it has checkpoints) is left as it is; returns whether it copied."""
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return False
    shutil.copytree(shared_dir, run_dir, ignore=shutil.ignore_patterns(*NOT_COPIED), dirs_exist_ok=True)
    return True


def run_train(config_arg: str, run_dir: str, point: dict, seed: int) -> int:
    """`scripts/train.py` (run as `python -m grpo_jax.cli.train`) for one point × seed into run_dir (log
    appended to run_dir/train.log)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        return subprocess.run(
            train_command(config_arg, run_dir, point, seed),
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode


def train_command(config_arg: str, workdir: str, point: dict, seed: int) -> list[str]:
    path, sep, arg = config_arg.partition(":")
    return [
        sys.executable,
        "-m",
        "grpo_jax.cli.train",
        f"--config={os.path.abspath(path)}{sep}{arg}",
        f"--workdir={workdir}",
        *(f"--config.{k}={_format_value(v)}" for k, v in overrides(point).items()),
        f"--config.seed={seed}",
        "--config.progress_bar=False",
    ]


def run_report(workdir: str) -> dict:
    """Numbers of one finished run (its last stage) from summary.json, config.json and metrics.jsonl."""
    from grpo_jax.metrics import read_metrics

    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    stages = list(config["stages"])
    last = stages[-1]
    offset = sum(config[s]["steps"] for s in stages[:-1])
    lines = read_metrics(workdir)
    train = [x for x in lines if x["stage"] != "eval" and x["step"] > offset]
    evals = [x for x in lines if x["stage"] == "eval" and x.get("train_stage", last) == last]
    tail = train[-max(1, math.ceil(len(train) / 10)) :]

    def mean(rows, key):
        values = [x[key] for x in rows if x.get(key) is not None]
        return sum(values) / len(values) if values else None

    stage = summary["stages"][last]
    previous = summary["stages"][stages[-2]] if len(stages) > 1 else {}
    return {
        "start_eval_accuracy": previous.get("final_eval_accuracy"),
        "final_eval_accuracy": stage["final_eval_accuracy"],
        "best_eval_accuracy": stage["best_eval_accuracy"],
        "reward_last10pct": mean(tail, "reward/mean"),
        "kl_mean": mean(train, "kl"),
        "completion_len_mean": mean(train, "completion_len/mean"),
        "zero_variance_frac": mean(train, "zero_variance_frac"),
        "refill_rounds": mean(train, "refill/rounds"),
        "step_time_s": mean(train[1:], "step_time_s"),  # the first step compiles
        "train_state_bytes": (stage.get("train_state_bytes") or {}).get("total"),
        "wall_time_s": summary["wall_time_s"],
        "eval_curve": [(x["step"] - offset, x["eval/accuracy"]) for x in evals],
        "reward_curve": [(x["step"] - offset, x["reward/mean"]) for x in train if "reward/mean" in x],
    }


def write_results(directory: str, points: list[dict], seeds: list[int]) -> list[dict]:
    """results.csv (+ results.png) over every finished point × seed; returns the rows."""
    keys = list(dict.fromkeys(k for p in points for k in overrides(p)))
    rows = []
    for index, point in enumerate(points):
        for seed in seeds:
            run_dir = os.path.join(directory, point_name(point), f"seed{seed}")
            if not os.path.exists(os.path.join(run_dir, "summary.json")):
                continue
            report = run_report(run_dir)
            rows.append(
                {
                    "point": index,
                    "name": point_name(point),
                    "seed": seed,
                    **{k: overrides(point).get(k, "") for k in keys},
                    **{c: report[c] for c in COLUMNS},
                    "_curves": (report["eval_curve"], report["reward_curve"]),
                }
            )
    fields = ["point", "name", "seed", *keys, *COLUMNS]
    tmp = os.path.join(directory, f".results.csv.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(directory, "results.csv"))  # atomic: parallel --point jobs may race
    if rows:
        plot_results(rows, os.path.join(directory, "results.png"))
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write(results_table(rows))
    return rows


def results_table(rows: list[dict]) -> str:
    """A markdown table with one line per point: each column's mean over the point's seeds, with the
    standard deviation (± ...) when there are several; accuracies in percent. Two derived columns, in
    accuracy points: `gain` = final − start accuracy, and `vs_<point 0>` = final accuracy minus point 0's
    of the same seed (a paired difference: seeds that start from the same SFT policy differ far less
    from each other than seeds do)."""
    percent = ("start_eval_accuracy", "final_eval_accuracy", "best_eval_accuracy")
    names = list(dict.fromkeys(r["name"] for r in rows))
    first = {r["seed"]: r for r in rows if names and r["name"] == names[0]}

    def number(row, column):
        value = row.get(column)
        return None if value in (None, "", "None") else float(value)

    def gain(row):
        start, final = number(row, "start_eval_accuracy"), number(row, "final_eval_accuracy")
        return None if start is None or final is None else final - start

    def versus_first(row):
        base = first.get(row["seed"])
        final = number(row, "final_eval_accuracy")
        base_final = number(base, "final_eval_accuracy") if base is not None else None
        return None if final is None or base_final is None else final - base_final

    derived = {"gain": gain, f"vs_{names[0] if names else 'first'}": versus_first}
    columns = [*COLUMNS[:2], *derived, *COLUMNS[2:]]
    header = ["point", "seeds", *(MIB_COLUMNS.get(c, c) for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in names:
        runs = [r for r in rows if r["name"] == name]
        cells = [name, ",".join(str(r["seed"]) for r in runs)]
        for column in columns:
            scale = 100.0 if column in percent or column in derived else 1.0
            scale = 2.0**-20 if column in MIB_COLUMNS else scale
            get = derived.get(column, lambda row, column=column: number(row, column))
            values = [scale * v for v in map(get, runs) if v is not None]
            if not values:
                cells.append("—")
                continue
            mean = sum(values) / len(values)
            digits = 0 if column == "wall_time_s" else (1 if scale == 100.0 else 3)
            digits = 2 if column in MIB_COLUMNS else digits
            cell = f"{mean:.{digits}f}"
            if len(values) > 1:
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                cell += f" ± {std:.{digits}f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SMOOTH = 10  # the training-reward curves: a running mean over this many steps


def plot_results(rows: list[dict], path: str) -> None:
    """Three panels: eval accuracy and training reward (running mean over SMOOTH steps) per point, mean
    and range over seeds; and each point's eval accuracy minus point 0's of the same seed (paired), mean
    and range, which separates the points from the seed-to-seed spread of the first two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (acc_axis, reward_axis, paired_axis) = plt.subplots(1, 3, figsize=(16, 4))
    names = list(dict.fromkeys(r["name"] for r in rows))
    first = {r["seed"]: dict(r["_curves"][0]) for r in rows if r["name"] == names[0]}

    def smooth(values):  # [seeds, steps] -> [seeds, steps - SMOOTH + 1]
        if values.shape[1] < SMOOTH:
            return values
        kernel = np.ones(SMOOTH) / SMOOTH
        return np.stack([np.convolve(v, kernel, mode="valid") for v in values])

    def band(axis, steps, values, name, color):
        axis.plot(
            steps, values.mean(axis=0), marker="o" if len(steps) < 30 else None, label=name, color=color
        )
        if len(values) > 1:
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15, color=color)

    for index, name in enumerate(names):
        color = f"C{index % 10}"
        runs = [r for r in rows if r["name"] == name]
        evals = [r["_curves"][0] for r in runs if r["_curves"][0]]
        if evals:
            n = min(len(c) for c in evals)
            steps = np.array([s for s, _ in evals[0][:n]])
            band(acc_axis, steps, 100.0 * np.array([[v for _, v in c[:n]] for c in evals]), name, color)
            paired = [
                [
                    100.0 * (v - first[r["seed"]][s])
                    for s, v in r["_curves"][0][:n]
                    if s in first.get(r["seed"], {})
                ]
                for r in runs
            ]
            paired = [p for p in paired if len(p) == n]
            if paired:
                band(paired_axis, steps, np.array(paired), name, color)
        rewards = [r["_curves"][1] for r in runs if r["_curves"][1]]
        if rewards:
            n = min(len(c) for c in rewards)
            values = smooth(np.array([[v for _, v in c[:n]] for c in rewards]))
            steps = np.array([s for s, _ in rewards[0][:n]])[n - values.shape[1] :]
            band(reward_axis, steps, values, name, color)
    acc_axis.set(xlabel="RL step", ylabel="held-out greedy pass@1 (%)", title="eval accuracy")
    reward_axis.set(
        xlabel="RL step", ylabel="mean reward", title=f"training reward (running mean of {SMOOTH})"
    )
    paired_axis.set(
        xlabel="RL step",
        ylabel="pass@1 minus the same seed's (points)",
        title=f"eval accuracy vs {names[0]}, paired by seed",
    )
    paired_axis.axhline(0.0, color="gray", linewidth=1)
    for axis in (acc_axis, reward_axis, paired_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: mean and range over {seeds} seed(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def main(argv):
    del argv
    try:
        config, points = load_sweep(_CONFIG.value)
        seeds = [int(s) for s in _SEEDS.value]
        selected = [int(i) for i in _POINT.value] if _POINT.value else list(range(len(points)))
        for i in selected:
            if not 0 <= i < len(points):
                raise SweepError(f"--point={i}: the sweep has points 0..{len(points) - 1}")
        for index, point in enumerate(points):
            apply_point(config, point, index)  # every point, not only the selected: fail before any run
        names = [point_name(p) for p in points]
        if len(set(names)) != len(names):
            raise SweepError(f"two points have the same name: {names}; give them distinct '_name' entries")
        if SHARED in names:
            raise SweepError(f"a point may not be named {SHARED!r} (the shared stages' folder)")
        shared = shared_stages(config, points) if _SHARE.value else []
    except (SweepError, ValueError) as error:
        _fail(error)
    directory = os.path.abspath(_WORKDIR.value)
    os.makedirs(directory, exist_ok=True)
    runs = [(i, s) for i in selected for s in seeds]
    failed = []
    for n, (index, seed) in enumerate(runs, start=1):
        point = points[index]
        run_dir = os.path.join(directory, point_name(point), f"seed{seed}")
        label = f"[{n}/{len(runs)}] point {index} {point_name(point)} seed {seed}"
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            print(f"{label}: skip (finished)", flush=True)
            continue
        if shared:
            shared_dir = os.path.join(directory, SHARED, f"seed{seed}")
            if not os.path.exists(os.path.join(shared_dir, "summary.json")):
                print(f"{label}: running the shared stages {shared} in {shared_dir}", flush=True)
                if run_train(_CONFIG.value, shared_dir, {"stages": tuple(shared)}, seed):
                    failed.append(label)
                    print(f"{label}: FAILED (shared stages; see {shared_dir}/train.log)", flush=True)
                    continue
            if start_from_shared(shared_dir, run_dir):
                print(f"{label}: starts after the shared stages {shared} of {shared_dir}", flush=True)
        print(f"{label}: running in {run_dir}", flush=True)
        start = time.time()
        returncode = run_train(_CONFIG.value, run_dir, point, seed)
        if returncode != 0:
            failed.append(label)
            print(f"{label}: FAILED (exit {returncode}; see {run_dir}/train.log)", flush=True)
            continue
        report = run_report(run_dir)
        print(
            f"{label}: done in {time.time() - start:.0f}s, "
            f"final eval accuracy {report['final_eval_accuracy']}",
            flush=True,
        )
    rows = write_results(directory, points, seeds)
    print(f"results: {len(rows)} run(s) in {directory}/results.csv, results.png", flush=True)
    if failed:
        _fail(f"{len(failed)} run(s) failed: {'; '.join(failed)}")


def entry_point() -> None:
    """The `grpo-sweep` console entry point (also `python scripts/sweep.py`)."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
