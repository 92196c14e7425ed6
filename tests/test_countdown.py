"""grpo_jax.rewards.countdown: TinyZero's Countdown score, with an exact parser instead of eval."""

from fractions import Fraction

import pytest

from grpo_jax.rewards.countdown import (
    countdown_reward,
    evaluate_expression,
    extract_equation,
    validate_equation,
)

NUMBERS = [3, 5, 7, 2]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>try</think><answer>(7 - 3) * 5 + 2</answer>", 1.0),  # 22
        ("<answer>2 + 5*(7-3)</answer>", 1.0),
        ("<answer>7*3+5-2*2</answer>", 0.1),  # 2 used twice
        ("<answer>7*3+5-2-3</answer>", 0.1),  # 3 used twice, and a fifth number
        ("<answer>(7 - 3) * 5</answer>", 0.1),  # 2 missing (20)
        ("<answer>(7 - 3) * 5 + 2 + 0</answer>", 0.1),  # extra number
        ("<answer>(7 - 3) * 5 + 2 = 22</answer>", 0.1),  # '=' is not allowed
        ("<answer>(7 - 3) * 5 + 2.0</answer>", 0.1),  # '.' is not allowed
        ("<answer>(7 - 3) ** 5 + 2</answer>", 0.1),  # '**' does not parse
        ("<answer>(7 - 3) * 5 + x2</answer>", 0.1),
        ("<answer>(7 - 3) * 5 + 2)</answer>", 0.1),  # unbalanced
        ("<answer>5 / (7 - 7) + 3 + 2</answer>", 0.1),  # wrong numbers anyway
        ("<answer>7 * 3 - 5 + 2</answer>", 0.1),  # valid, 18 != 22
        ("(7 - 3) * 5 + 2", 0.0),  # no answer tag
        ("<answer>(7 - 3) * 5 + 2", 0.0),  # unclosed tag
        ("<answer>1</answer> then <answer>(7-3)*5+2</answer>", 1.0),  # the last tag counts
        ("<answer>(7-3)*5+2</answer> then <answer>1</answer>", 0.1),
    ],
)
def test_countdown_reward(completion, expected):
    assert countdown_reward(completion, NUMBERS, 22) == pytest.approx(expected)


def test_division_by_zero_gives_format_score():
    assert countdown_reward("<answer>3 / (5 - 5)</answer>", [3, 5, 5], 1) == pytest.approx(0.1)


def test_exact_fractions_and_custom_scores():
    # 8 / (3 - 8/3) is exactly 24 over Fractions (23.999999999999986 in floating point).
    assert countdown_reward("<answer>8 / (3 - 8 / 3)</answer>", [8, 3, 8, 3], 24) == 1.0
    assert (
        countdown_reward("<answer>8/(3-8/3)</answer>", [3, 3, 8, 8], 24, score=2.0, format_score=0.0) == 2.0
    )
    assert countdown_reward("<answer>8+3+8+3</answer>", [3, 3, 8, 8], 24, format_score=0.0) == 0.0


def test_unary_minus_is_accepted_like_eval():
    assert countdown_reward("<answer>-3 + 5</answer>", [3, 5], 2) == 1.0


def test_evaluate_expression():
    assert evaluate_expression("1 + 2 * 3") == 7
    assert evaluate_expression("(1 + 2) * 3") == 9
    assert evaluate_expression("10 - 4 - 3") == 3  # left associative
    assert evaluate_expression("100 / 10 / 5") == 2
    assert evaluate_expression("7 / 2") == Fraction(7, 2)
    assert evaluate_expression("-(2 - 5) * -2") == -6
    for bad in ["", "1 +", "(1", "1 2", "1 ** 2", "2 ^ 3", "__import__('os')"]:
        with pytest.raises(ValueError):
            evaluate_expression(bad)
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("1 / (2 - 2)")


def test_validate_equation_and_extract():
    assert validate_equation("(7 - 3) * 5 + 2", [2, 3, 5, 7])
    assert not validate_equation("(7 - 3) * 5", [2, 3, 5, 7])
    assert not validate_equation("7 - 3 * 5 + 2 + 2", [2, 3, 5, 7])
    assert not validate_equation("import os", [])
    assert validate_equation("10 + 10", [10, 10])
    assert not validate_equation("1010", [10, 10])
    assert extract_equation("a <answer> 1+2 </answer>") == "1+2"
    assert extract_equation("nothing") is None
