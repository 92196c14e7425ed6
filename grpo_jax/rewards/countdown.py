"""Countdown verifier, as in TinyZero (github.com/Jiayi-Pan/TinyZero, verl/utils/reward_score/countdown.py).

The task: combine the given numbers, each exactly once, with + - * / and parentheses to reach the target.
Scores (TinyZero's `compute_score`): no `<answer>...</answer>` -> 0; an answer that is not a valid equation
over exactly these numbers, that divides by zero, or that misses the target -> `format_score`; a correct
equation (|value - target| < 1e-5) -> `score`.

Differences from TinyZero, all stricter or safer: the expression is evaluated by a recursive-descent parser
over exact `fractions.Fraction`s (never `eval`); only integers, `+ - * / ( )` and whitespace are allowed (no
`.`, no `**`); unary `+`/`-` are accepted, as Python's `eval` accepts them in TinyZero.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

_ALLOWED = re.compile(r"[\d+\-*/()\s]+")
_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")
_MAX_EQUATION_CHARS = 512
_TOLERANCE = 1e-5


def extract_equation(completion_text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>`, or None."""
    answers = re.findall(r"<answer>(.*?)</answer>", completion_text or "", flags=re.DOTALL)
    return answers[-1].strip() if answers else None


def validate_equation(equation: str, numbers: Sequence[int]) -> bool:
    """Only integers, `+ - * / ( )` and whitespace, using exactly `numbers` (as a multiset)."""
    if len(equation) > _MAX_EQUATION_CHARS or not _ALLOWED.fullmatch(equation):
        return False
    used = [int(n) for n in re.findall(r"\d+", equation)]
    return Counter(used) == Counter(int(n) for n in numbers)


class _Parser:
    """expr := term ((+|-) term)*; term := factor ((*|/) factor)*; factor := (+|-) factor | int | ( expr )."""

    def __init__(self, expression: str):
        self.tokens: list[str] = []
        position = 0
        expression = expression.rstrip()
        while position < len(expression):
            match = _TOKEN.match(expression, position)
            if not match:
                raise ValueError(f"unexpected character at {position} in {expression!r}")
            self.tokens.append(match.group(1))
            position = match.end()
        self.position = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError("unexpected end of expression")
        self.position += 1
        return token

    def parse(self) -> Fraction:
        value = self.expression()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return value

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = value * self.factor()
            else:
                divisor = self.factor()
                if divisor == 0:
                    raise ZeroDivisionError("division by zero")
                value = value / divisor
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token == "-":
            return -self.factor()
        if token == "+":
            return self.factor()
        if token == "(":
            value = self.expression()
            if self.take() != ")":
                raise ValueError("expected ')'")
            return value
        if token.isdigit():
            return Fraction(int(token))
        raise ValueError(f"unexpected {token!r}")


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an arithmetic expression over integers with `+ - * / ( )`.

    Raises ValueError on a malformed or too long expression and ZeroDivisionError on division by zero.
    """
    if len(expression) > _MAX_EQUATION_CHARS:
        raise ValueError("expression too long")
    return _Parser(expression).parse()


def countdown_reward(
    completion_text: str,
    numbers: Sequence[int],
    target: int | float,
    *,
    format_score: float = 0.1,
    score: float = 1.0,
) -> float:
    """TinyZero's Countdown score: 0 without an answer, `score` if correct, else `format_score`."""
    equation = extract_equation(completion_text)
    if equation is None:
        return 0.0
    if not validate_equation(equation, numbers):
        return float(format_score)
    try:
        value = evaluate_expression(equation)
    except (ValueError, ZeroDivisionError, RecursionError):
        return float(format_score)
    return float(score) if abs(float(value - Fraction(target))) < _TOLERANCE else float(format_score)
