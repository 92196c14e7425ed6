"""grpo_jax.evaluation: unbiased pass@k against brute-force combinatorics, maj@k on exact cases."""

import itertools

import numpy as np
import pytest

from grpo_jax.evaluation import maj_at_k, majority_vote, pass_at_k, summarize_eval


def brute_force_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised_and_exact_values():
    values = pass_at_k(np.array([10, 10, 10, 4]), np.array([0, 3, 10, 1]), 2)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45; 1 - C(3,2)/C(4,2) = 1 - 3/6.
    np.testing.assert_allclose(values, [0.0, 1 - 21 / 45, 1.0, 0.5], rtol=1e-12)
    assert values.dtype == np.float64 and values.shape == (4,)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # Large n stays stable: 1 - C(900,100)/C(1000,100) without overflow.
    assert 0.9999 < pass_at_k(1000, 100, 100) <= 1.0
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_first_occurrence():
    assert majority_vote(["1/2", "0.5", "3", r"\frac{1}{2}", "3"]) == "1/2"
    assert majority_vote(["3", "1/2", "0.5", "3"]) == "3"  # tie 2-2: "3" appeared first
    assert majority_vote(["1/2", "3", "3", "0.5"]) == "1/2"  # tie 2-2: "1/2" appeared first
    assert majority_vote([None, None, "4"]) == "4"  # None never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_maj_at_k_exact_cases():
    answers = [
        ["5", "5", "6", "6", "6"],  # maj@3 = 5 (right), maj@5 = 6 (wrong)
        [None, None, "7", None, None],  # maj@3 = 7 (right)
        [None, None, None, "8", "8"],  # maj@3: all None -> wrong; maj@5 = 8 (right)
        ["0.5", "1/2", "2", "2", "2"],  # maj@3 = 0.5 (right); maj@5 = 2 (wrong)
    ]
    gold = ["5", "7", "8", r"\frac12"]
    assert maj_at_k(answers, gold, 3) == pytest.approx(3 / 4)
    assert maj_at_k(answers, gold, 5) == pytest.approx(2 / 4)
    assert maj_at_k(answers, gold, 1) == pytest.approx(2 / 4)
    assert maj_at_k(answers, lambda index, answer: answer == "6", 5) == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        maj_at_k(answers, gold, 6)


def test_summarize_eval_metric_names_and_values():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    answers = [["1", "2", "2", "3"], ["4", "4", "4", "4"], ["9", None, None, "9"]]
    gold = ["1", "4", "5"]
    metrics = summarize_eval(correct, k=2, answers=answers, gold=gold)
    assert set(metrics) == {"eval/accuracy", "eval/pass@k", "eval/maj@k", "eval/k"}
    assert metrics["eval/accuracy"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert metrics["eval/pass@k"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # maj@2: problem 0 votes "1" (tie, first), problem 1 "4", problem 2 "9" (wrong).
    assert metrics["eval/maj@k"] == pytest.approx(2 / 3)
    assert metrics["eval/k"] == 2
    assert set(summarize_eval(correct, k=1)) == {"eval/accuracy", "eval/pass@k", "eval/k"}
