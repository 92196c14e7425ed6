"""Host memory over a long run: the quickstart's GRPO stage for 1,000 steps, host RSS every 50 steps.

    python benchmarks/benchmark_rss.py --out=benchmarks/host_rss

Runs `scripts/train.py` on `configs/quickstart.py` exactly as a user would (metrics.jsonl, TensorBoard,
evals and async checkpoints on) with the GRPO stage raised to `--grpo_steps`, and samples the training
process's resident set size (`VmRSS` in /proc/PID/status, Linux) each time the run's `metrics.jsonl`
reaches another multiple of `--every` GRPO steps. A leak (metrics kept on the host, a growing compile
cache, a checkpoint manager holding old steps) shows as RSS growing with the step count; the goal is a
flat curve after warm-up: growth < 5 % between the median of the first and of the last four samples after
`--warmup_steps`.

Writes OUT.json (samples, growth, the command, versions), OUT.md (table) and OUT.png (the curve).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except FileNotFoundError:
        return None
    return None


def last_grpo_step(metrics_path: str, offset: int) -> tuple[int | None, int]:
    """The newest GRPO step in metrics.jsonl after byte `offset`, and the new offset (whole lines only)."""
    if not os.path.exists(metrics_path):
        return None, offset
    with open(metrics_path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    step = None
    for line in chunk[:end].splitlines():
        record = json.loads(line)
        if record.get("stage") == "grpo":
            step = int(record["step"])
    return step, offset + end


def growth(samples: list[dict], warmup_steps: int, window: int = 4) -> float | None:
    """Relative RSS growth after `warmup_steps` GRPO steps: the median of the last `window` samples over
    the median of the first `window` (RSS swings by ~20 % between samples as the allocator returns
    memory, so single samples would measure that swing rather than a trend)."""
    after = [s["rss_mib"] for s in samples if s["grpo_step"] >= warmup_steps]
    if len(after) < 2 * window:
        return None
    return statistics.median(after[-window:]) / statistics.median(after[:window]) - 1.0


def run(workdir: str, grpo_steps: int, every: int, sft_steps: int) -> tuple[list[dict], list[str]]:
    command = [
        sys.executable,
        "scripts/train.py",
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        f"--config.sft.steps={sft_steps}",
        f"--config.sft.eval_every={sft_steps}",
        f"--config.grpo.steps={grpo_steps}",
        "--config.progress_bar=False",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, env=env, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    samples: list[dict] = []
    offset, next_step, start = 0, every, time.time()
    while proc.poll() is None:
        step, offset = last_grpo_step(metrics_path, offset)
        if step is not None and step - sft_steps >= next_step:
            rss = rss_mib(proc.pid)
            if rss is not None:
                grpo_step = step - sft_steps
                samples.append(dict(grpo_step=grpo_step, rss_mib=rss, elapsed_s=time.time() - start))
                print(f"GRPO step {grpo_step:5d}  RSS {rss:8.1f} MiB", flush=True)
                next_step = (grpo_step // every + 1) * every
        time.sleep(0.2)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"benchmark_rss: train.py exited {proc.returncode}:\n{stderr[-3000:]}")
    return samples, command


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_outputs(out: str, samples: list[dict], command: list[str], warmup_steps: int) -> dict:
    import jax  # noqa: PLC0415 (versions only; the run itself is a subprocess)

    rel = growth(samples, warmup_steps)
    report = dict(
        date=datetime.date.today().isoformat(),
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        train_command=" ".join(
            shlex.quote("--workdir=DIR" if a.startswith("--workdir=") else a) for a in command[1:]
        ),
        jax=jax.__version__,
        commit=_git_commit(),
        warmup_steps=warmup_steps,
        growth_after_warmup=rel,
        goal="growth < 5 % after warm-up",
        met=None if rel is None else rel < 0.05,
        samples=samples,
    )
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# Host memory over 1,000 GRPO steps (quickstart)",
        "",
        f"`{report['command']}` ({report['date']}, commit {report['commit']}, jax {report['jax']}) runs",
        f"`python {report['train_command']}` and samples the training process's RSS.",
        "",
        f"Growth after GRPO step {warmup_steps} (median of the last 4 samples over the first 4): "
        f"**{100 * rel:+.2f} %** (goal < 5 %: {'met' if report['met'] else 'NOT met'})."
        if rel is not None
        else "Too few samples to compute growth.",
        "",
        "| GRPO step | RSS (MiB) |",
        "|---:|---:|",
        *[f"| {s['grpo_step']} | {s['rss_mib']:.1f} |" for s in samples],
        "",
    ]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s["grpo_step"] for s in samples], [s["rss_mib"] for s in samples], marker="o")
        ax.axvline(warmup_steps, color="grey", linestyle=":", label="warm-up")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("host RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title("quickstart GRPO: host memory")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out + ".png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written")
    return report


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = FLAGS.workdir or os.path.join(tmp, "run")
        samples, command = run(workdir, FLAGS.grpo_steps, FLAGS.every, FLAGS.sft_steps)
    report = write_outputs(FLAGS.out, samples, command, FLAGS.warmup_steps)
    print(json.dumps({k: report[k] for k in ("growth_after_warmup", "met")}))


if __name__ == "__main__":
    flags.DEFINE_string("out", "benchmarks/host_rss", "output path without extension (.json, .md, .png)")
    flags.DEFINE_string("workdir", "", "run directory (default: a temporary one, removed afterwards)")
    flags.DEFINE_integer("grpo_steps", 1000, "GRPO steps")
    flags.DEFINE_integer("sft_steps", 225, "SFT steps before GRPO (the quickstart's)")
    flags.DEFINE_integer("every", 50, "sample RSS every this many GRPO steps")
    flags.DEFINE_integer("warmup_steps", 100, "growth is measured from the first sample at or after this")
    app.run(main)
