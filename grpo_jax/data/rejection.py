"""Rejection-sampling SFT data, DeepSeek-R1 (arXiv 2501.12948) §2.3.3: keep the correct samples of the RL
checkpoint, mix in non-reasoning data (about 3 : 1 reasoning : non-reasoning), and write a JSONL file that
`load_jsonl_task(path, kind="sft")` reads back for SFT from the base model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _subsample(rows: list[Any], count: int, rng: np.random.Generator) -> list[Any]:
    """`count` of `rows`, chosen at random, in their original order."""
    if count >= len(rows):
        return rows
    keep = np.sort(rng.choice(len(rows), size=count, replace=False))
    return [rows[i] for i in keep]


def write_rejection_sft(
    path: str | os.PathLike,
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float] | np.ndarray,
    *,
    threshold: float = 1.0,
    max_per_prompt: int | None = None,
    dedupe: bool = True,
    non_reasoning: Sequence[dict[str, str]] | None = None,
    ratio: float = 3.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Filters sampled completions and writes `{"prompt", "completion", "source"}` lines to `path`.

    In order: keep completions with reward >= threshold (NaN fails); drop repeated (prompt, completion) pairs,
    first kept (`dedupe`, also applied to `non_reasoning`); keep at most `max_per_prompt` random completions
    per prompt; then mix with `non_reasoning` at `ratio` reasoning : non-reasoning by randomly subsampling
    whichever side is in excess (the other side is kept whole, the subsampled count is rounded to the nearest
    integer). Rows are written in a random order. Everything random draws from `seed`, so the file is
    reproducible. The file is written to `path + ".tmp"` and renamed, so a crash never leaves a partial file.

    Args:
      prompts, completions, rewards: one entry per sampled completion (a prompt repeats for its G samples).
      non_reasoning: rows with "prompt" and "completion" (written with source "non_reasoning"); None or
        empty: reasoning rows only.

    Returns:
      counts at each stage: num_candidates, num_above_threshold, num_duplicates, num_capped, num_reasoning,
      num_non_reasoning, num_written, and the achieved `ratio` (None without non-reasoning rows).
    """
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError(
            "prompts, completions and rewards differ in length: "
            f"{len(prompts)}, {len(completions)}, {len(rewards)}."
        )
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0; got {ratio}.")
    if max_per_prompt is not None and max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1 or None; got {max_per_prompt}.")
    rng = np.random.default_rng(seed)

    passed = [(p, c) for p, c, r in zip(prompts, completions, rewards, strict=True) if r >= threshold]
    reasoning = list(dict.fromkeys(passed)) if dedupe else passed
    num_duplicates = len(passed) - len(reasoning)

    num_capped = 0
    if max_per_prompt is not None:
        by_prompt: dict[str, list[tuple[str, str]]] = {}
        for row in reasoning:
            by_prompt.setdefault(row[0], []).append(row)
        reasoning = []
        for rows in by_prompt.values():
            kept = _subsample(rows, max_per_prompt, rng)
            num_capped += len(rows) - len(kept)
            reasoning.extend(kept)

    other: list[tuple[str, str]] = []
    for i, row in enumerate(non_reasoning or []):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"non_reasoning[{i}] needs 'prompt' and 'completion'; has {sorted(row)}.")
        other.append((row["prompt"], row["completion"]))
    if dedupe:
        other = list(dict.fromkeys(other))

    if other:
        if len(reasoning) > ratio * len(other):
            reasoning = _subsample(reasoning, round(ratio * len(other)), rng)
        else:
            other = _subsample(other, round(len(reasoning) / ratio), rng)

    rows = [(p, c, "reasoning") for p, c in reasoning] + [(p, c, "non_reasoning") for p, c in other]
    order = rng.permutation(len(rows))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in order:
            prompt, completion, source = rows[i]
            f.write(json.dumps({"prompt": prompt, "completion": completion, "source": source}) + "\n")
    os.replace(path + ".tmp", path)

    achieved = None
    if other:
        achieved = len(reasoning) / len(other)
    elif non_reasoning and reasoning:
        achieved = math.inf
    return {
        "num_candidates": len(rewards),
        "num_above_threshold": len(passed),
        "num_duplicates": num_duplicates,
        "num_capped": num_capped,
        "num_reasoning": len(reasoning),
        "num_non_reasoning": len(other),
        "num_written": len(rows),
        "ratio": achieved,
    }
