"""Evaluation metrics over sampled answers: pass@1, pass@k (unbiased), maj@k (majority vote), and the
sampling settings a number was measured with.

Metric names written to metrics.jsonl are a contract (docs/CONTRACTS.md): `eval/accuracy` (pass@1),
`eval/pass@k`, `eval/maj@k`; `summarize_eval` also writes `eval/k`, the k they were computed with.
Pure functions of the per-sample verdicts: the sampling settings a number was measured with are read
from a run by `grpo_jax.workdir.run_sampling_settings`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from grpo_jax.rewards.math import is_equivalent

Equivalence = Callable[[str, str], bool]


def _pass_at_k_one(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), per problem (Chen et al. 2021, arXiv 2107.03374, eq. 1).

    Uses the paper's stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i). `num_samples` (n) and
    `num_correct` (c) broadcast against each other (scalars or `[num_problems]`); returns float64 of the
    broadcast shape. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    n, c = np.broadcast_arrays(np.asarray(num_samples), np.asarray(num_correct))
    values = [_pass_at_k_one(int(ni), int(ci), int(k)) for ni, ci in zip(n.ravel(), c.ravel(), strict=True)]
    return np.asarray(values, np.float64).reshape(n.shape)


def majority_vote(answers: Sequence[str | None], equivalent: Equivalence = is_equivalent) -> str | None:
    """Representative of the largest equivalence class of the non-None answers, or None if all are None.

    Each answer joins the first class whose representative (its first member) it is equivalent to; ties
    go to the class that appeared first.
    """
    representatives: list[str] = []
    counts: list[int] = []
    for answer in answers:
        if answer is None:
            continue
        for index, representative in enumerate(representatives):
            if answer == representative or equivalent(answer, representative):
                counts[index] += 1
                break
        else:
            representatives.append(answer)
            counts.append(1)
    if not representatives:
        return None
    return representatives[int(np.argmax(counts))]


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    gold: Sequence[str] | Callable[[int, str], bool],
    k: int,
    *,
    equivalent: Equivalence = is_equivalent,
) -> float:
    """maj@k: share of problems whose majority answer over the first k samples is correct.

    Args:
      answers: per problem, the extracted answer of each sample (None when none was found).
      gold: per problem the gold answer (compared with `equivalent`), or `correct(problem_index, answer)`.
      k: samples voted on per problem (the first k); every problem needs at least k.
      equivalent: groups answers into vote classes and compares with the gold answer.
    """
    if not answers:
        raise ValueError("maj_at_k needs at least one problem")
    correct = []
    for index, samples in enumerate(answers):
        if len(samples) < k or k < 1:
            raise ValueError(f"problem {index} has {len(samples)} samples, need k={k} >= 1 of them")
        winner = majority_vote(samples[:k], equivalent)
        if winner is None:
            correct.append(False)
        elif callable(gold):
            correct.append(bool(gold(index, winner)))
        else:
            correct.append(bool(equivalent(winner, gold[index])))
    return float(np.mean(correct))


def summarize_eval(
    correct: Sequence[Sequence[bool]],
    *,
    k: int,
    answers: Sequence[Sequence[str | None]] | None = None,
    gold: Sequence[str] | Callable[[int, str], bool] | None = None,
    equivalent: Equivalence = is_equivalent,
) -> dict[str, float | int]:
    """The eval line of metrics.jsonl from per-sample correctness `[num_problems][num_samples]`.

    `eval/accuracy` is the mean pass@1 (c/n per problem), `eval/pass@k` the mean unbiased pass@k,
    `eval/maj@k` (only when `answers` and `gold` are given) the majority-vote accuracy over the first k.
    Problems may have different sample counts, each at least k.
    """
    if not correct:
        raise ValueError("summarize_eval needs at least one problem")
    n = np.array([len(samples) for samples in correct])
    c = np.array([int(np.sum(np.asarray(samples, bool))) for samples in correct])
    metrics = {
        "eval/accuracy": float(np.mean(pass_at_k(n, c, 1))),
        "eval/pass@k": float(np.mean(pass_at_k(n, c, k))),
        "eval/k": k,
    }
    if answers is not None and gold is not None:
        metrics["eval/maj@k"] = maj_at_k(answers, gold, k, equivalent=equivalent)
    return metrics
