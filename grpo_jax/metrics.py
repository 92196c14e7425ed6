"""Metric logging: `DIR/metrics.jsonl` (the contract), TensorBoard scalars, a progress bar, curves.

metrics.jsonl (docs/CONTRACTS.md) holds one JSON object per line: `step` (int), `stage` ("sft", "grpo",
"eval", ...) and the metrics of that step. JSON has no NaN/inf, so a non-finite metric is written as
`null` and its name is listed in the line's `nonfinite` key (absent when every value is finite).
Lines are flushed one by one, so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CURVES = ("reward/mean", "eval/accuracy", "kl", "completion_len/mean")


# ----------------------------------------------------------------------------------------------------
# Value conversion
# ----------------------------------------------------------------------------------------------------


def _to_python(name: str, value: Any) -> Any:
    """A host scalar as a Python int/float/bool/str; arrays must have exactly one element."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    scalar = array.reshape(()).item()
    return scalar


def to_json_line(step: int, stage: str, metrics: Mapping[str, Any]) -> dict:
    """The JSON object written for one step: step, stage, metrics (non-finite -> null + `nonfinite`).

    Device arrays are fetched with one `jax.device_get` for the whole dict.
    """
    reserved = sorted({"step", "stage", "nonfinite"} & set(metrics))
    if reserved:
        raise ValueError(f"metric names {reserved} are reserved in metrics.jsonl")
    host = jax.device_get(dict(metrics))
    line: dict[str, Any] = {"step": int(step), "stage": str(stage)}
    nonfinite = []
    for name in metrics:  # insertion order (device_get returns the dict sorted)
        value = _to_python(name, host[name])
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite.append(name)
            value = None
        line[name] = value
    if nonfinite:
        line["nonfinite"] = nonfinite
    return line


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends metric lines to `workdir/metrics.jsonl` and TensorBoard scalars to `workdir/tensorboard/`.

    TensorBoard tags are `stage/metric` (e.g. `grpo/reward/mean`). active: whether this process writes;
    by default only process 0 does, so multi-host runs produce one file.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, active: bool | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.active = jax.process_index() == 0 if active is None else active
        self._file = None
        self._tensorboard = None
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR))

    def write(self, step: int, stage: str, metrics: Mapping[str, Any]) -> dict:
        """Append one line (and TensorBoard scalars); returns the line as written."""
        line = to_json_line(step, stage, metrics)
        if not self.active:
            return line
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in line.items():
                if name in ("step", "stage", "nonfinite") or isinstance(value, (str, bool)) or value is None:
                    continue
                tag = name if name.startswith(f"{stage}/") else f"{stage}/{name}"
                self._tensorboard.add_scalar(tag.replace("@", "_at_"), value, global_step=line["step"])
        return line

    @property
    def num_lines(self) -> int:
        """Lines now in metrics.jsonl; store it in a checkpoint to resume with `truncate_lines`."""
        if not self.path.exists():
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def truncate_after(self, step: int, stage_order: Sequence[str], stage: str | None = None) -> int:
        """Drop every line written after the resume point (`stage`, `step`); returns lines dropped.

        stage_order: the run's stages in the order they run (e.g. ["sft", "grpo", "sft2", "grpo2"]);
        stage: the stage being resumed, default `stage_order[-1]`. A line is after the resume point when
        its stage comes later in `stage_order`, or it is the same stage with a larger step. Lines of a
        stage not in `stage_order` (e.g. "eval") belong to the nearest stage line above them. Because the
        file is chronological, everything from the first line past the resume point is dropped, so a
        resumed run's file equals the uninterrupted run's. The file is rewritten atomically.
        """
        stage = stage_order[-1] if stage is None else stage
        if stage not in stage_order:
            raise ValueError(f"truncate_after: stage {stage!r} is not in stage_order {list(stage_order)}")
        rank = {name: index for index, name in enumerate(stage_order)}
        resume_point = (rank[stage], int(step))
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        current_rank = -1
        keep = len(lines)
        for index, text in enumerate(lines):
            record = json.loads(text)
            current_rank = rank.get(record["stage"], current_rank)
            if (current_rank, int(record["step"])) > resume_point:
                keep = index
                break
        return self._rewrite(lines, keep)

    def truncate_lines(self, num_lines: int) -> int:
        """Keep only the first `num_lines` lines (a `num_lines` saved with a checkpoint)."""
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        return self._rewrite(lines, num_lines)

    def _rewrite(self, lines: list[str], keep: int) -> int:
        dropped = max(len(lines) - keep, 0)
        if not self.active or dropped == 0:
            return dropped
        self._file.close()
        _atomic_write_text(self.path, "".join(lines[:keep]))
        self._file = open(self.path, "a")
        return dropped

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All lines of a metrics.jsonl (or of `path/metrics.jsonl` for a workdir), as dicts.

    Raises ValueError naming the file and line of a malformed entry.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
    return records


# ----------------------------------------------------------------------------------------------------
# Reduction, summary, progress
# ----------------------------------------------------------------------------------------------------


def reduce_metrics(history: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each numeric key over the dicts that have it (for logging every N steps).

    Device values are fetched with one `jax.device_get`; strings and None are skipped.
    """
    history = jax.device_get([dict(h) for h in history])
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in history:
        for name, value in record.items():
            value = _to_python(name, value)
            if value is None or isinstance(value, str):
                continue
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        array = np.asarray(value)
        return _json_safe(array.tolist()) if array.ndim else _json_safe(array.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(workdir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write `workdir/summary.json` atomically (non-finite floats become null); returns its path."""
    path = Path(workdir) / SUMMARY_FILE
    _atomic_write_text(
        path, json.dumps(_json_safe(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return path


class ProgressBar:
    """A tqdm bar with the latest step metrics (reward, accuracy, ...) as postfix and tqdm's ETA.

    Writes to stderr by default so stdout stays clean for logs and piping; disable=True turns it off.
    """

    def __init__(self, total: int, desc: str = "", *, initial: int = 0, disable: bool = False, file=None):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            desc=desc,
            initial=initial,
            disable=disable,
            file=sys.stderr if file is None else file,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by n steps; keyword values (floats formatted to 4 significant digits) show at the end."""
        if postfix:
            shown = {}
            for name, value in jax.device_get(postfix).items():
                value = _to_python(name, value)
                shown[name] = f"{value:.4g}" if isinstance(value, float) else value
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------


def plot_curves(
    metrics_path: str | os.PathLike, out_png: str | os.PathLike, names: Sequence[str] = CURVES
) -> Path:
    """Save a PNG with one subplot per metric name vs step, one line per stage that logged it.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). A metric no line
    has gets an empty subplot saying so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    columns = 2
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(6 * columns, 3.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        by_stage: dict[str, list[tuple[int, float]]] = {}
        for record in records:
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_stage.setdefault(record["stage"], []).append((record["step"], float(value)))
        for stage, points in by_stage.items():
            steps = [step for step, _ in sorted(points)]
            values = [value for _, value in sorted(points)]
            ax.plot(steps, values, label=stage, marker="." if len(points) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if by_stage:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png
