"""Synthetic reasoning tasks with verifiable answers: arithmetic, Countdown (also with a Python tool), and
multiplication with a calculator tool. No download, seeded.

An example is a plain dict: `{"prompt", "answer", "completion", "task", ...task fields}`; `completion` is
a demonstration for cold-start SFT: R1 format (`<think> steps </think> <answer> answer </answer>`), or, for
a task whose demonstrations call tools, a tool call, the tool's observation and the answer. Such an example
also has `completion_segments`, `[(text, trainable), ...]` whose texts join to `completion`: the SFT
pipeline encodes each segment on its own (as the multi-turn rollout encodes an observation) and masks the
loss on the untrainable ones, so the model never learns to write a tool's result
(`grpo_jax.data.pipeline.tokenize_sft_example`).

A task's `special_symbols` are the pieces an in-process tokenizer must hold as single tokens
(`task_special_symbols`): the R1 tags, plus the tool-call tags when the demonstrations call tools.

Splits. Every problem belongs to "train" or "test" by a stable hash of its canonical form (operand order
of commutative operations and of Countdown numbers removed), independent of the seed and of the sizes
asked for: no seed's train split ever shares a problem with any seed's test split. The seed only decides
which problems of a split are drawn and in what order; `split(name, n)` is a prefix of `split(name, m)`
for n <= m.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import operator
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from grpo_jax.data import countdown_program
from grpo_jax.envs.sandbox import SandboxResult
from grpo_jax.envs.tool_format import ToolFormat, format_call, format_observation
from grpo_jax.envs.tools import Calculator, PythonTool
from grpo_jax.tokenizers import R1_SPECIAL_SYMBOLS

Example = dict[str, Any]
SPLITS = ("train", "test")


def _split_of(canonical: str, test_fraction: float) -> str:
    digest = hashlib.blake2b(canonical.encode(), digest_size=8, person=b"grpo_jax_split").digest()
    return "test" if int.from_bytes(digest, "little") < test_fraction * 2**64 else "train"


def _r1_completion(steps: Sequence[str], answer: str) -> str:
    return f"<think> {' , '.join(steps)} </think> <answer> {answer} </answer>"


def _inclusive_range(value: int | Sequence[int], name: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be a positive int or an increasing (min, max) pair; got {value!r}.")
    return int(lo), int(hi)


class _HashSplitTask:
    """Problems drawn by seed, assigned to a split by hash. Subclasses define the problem space."""

    name = ""
    # The user-defined symbols (one token each) of an in-process tokenizer for this task.
    special_symbols: tuple[str, ...] = R1_SPECIAL_SYMBOLS

    def __init__(self, *, seed: int, test_fraction: float, max_enumerate: int):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.max_enumerate = int(max_enumerate)
        self._enumerated: dict[str, list[Any]] = {}

    # Subclass hooks.
    def _space_size(self) -> int | None:
        """Number of distinct problems, if it can be enumerated; None for an open-ended space."""
        return None

    def _enumerate(self) -> Iterator[Any]:
        raise NotImplementedError

    def _sample(self, rng: np.random.Generator) -> Any | None:
        raise NotImplementedError

    def _canonical(self, problem: Any) -> str:
        raise NotImplementedError

    def _example(self, problem: Any) -> Example:
        raise NotImplementedError

    def _dedupe_key(self, problem: Any) -> Any:
        return problem

    def split(self, name: str, size: int) -> list[Example]:
        """`size` distinct examples of split `name` ("train" or "test"), deterministic for the seed."""
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; choose one of {SPLITS}.")
        if size < 0:
            raise ValueError(f"size must be >= 0; got {size}.")
        space = self._space_size()
        if space is not None and space <= self.max_enumerate:
            problems = self._enumerated_split(name)
            if size > len(problems):
                raise ValueError(
                    f"{self.name} split {name!r}: asked for {size} examples but only {len(problems)} "
                    f"distinct problems exist in it ({space} in all, test_fraction={self.test_fraction}). "
                    f"Widen the task (more digits/operations) or ask for fewer."
                )
            return [self._example(p) for p in problems[:size]]
        return [self._example(p) for p in self._sampled_split(name, size)]

    def _enumerated_split(self, name: str) -> list[Any]:
        if name not in self._enumerated:
            problems = [
                p for p in self._enumerate() if _split_of(self._canonical(p), self.test_fraction) == name
            ]
            order = np.random.default_rng([self.seed, SPLITS.index(name)]).permutation(len(problems))
            self._enumerated[name] = [problems[i] for i in order]
        return self._enumerated[name]

    def _sampled_split(self, name: str, size: int) -> list[Any]:
        rng = np.random.default_rng([self.seed, SPLITS.index(name)])
        seen, problems = set(), []
        max_attempts = 1000 + 200 * size
        for _ in range(max_attempts):
            if len(problems) == size:
                return problems
            problem = self._sample(rng)
            if problem is None or _split_of(self._canonical(problem), self.test_fraction) != name:
                continue
            key = self._dedupe_key(problem)
            if key not in seen:
                seen.add(key)
                problems.append(problem)
        if len(problems) == size:
            return problems
        raise ValueError(
            f"{self.name} split {name!r}: found only {len(problems)} distinct problems of the {size} "
            f"asked for in {max_attempts} draws. Widen the task or ask for fewer."
        )


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def _digits_lsb_first(value: int, length: int) -> list[int]:
    return [(value // 10**i) % 10 for i in range(length)]


def addition_steps(operands: Sequence[int]) -> tuple[list[str], int]:
    """Column addition, least significant column first: `d1+d2+carry=s` per column (carry always written)."""
    width = max(len(str(x)) for x in operands)
    columns = [_digits_lsb_first(x, width) for x in operands]
    steps, digits, carry = [], [], 0
    for i in range(width):
        terms = [col[i] for col in columns]
        total = sum(terms) + carry
        steps.append("+".join(map(str, terms)) + f"+{carry}={total}")
        digits.append(total % 10)
        carry = total // 10
    result = carry * 10**width + sum(d * 10**i for i, d in enumerate(digits))
    return steps, result


def subtraction_steps(a: int, b: int) -> tuple[list[str], int]:
    """Column subtraction a-b (a >= b), least significant first: `x-y-borrow=d`, written `1x-y-borrow=d` when
    the column borrows 10 from the next one."""
    width = len(str(a))
    steps, digits, borrow = [], [], 0
    for x, y in zip(_digits_lsb_first(a, width), _digits_lsb_first(b, width), strict=True):
        diff = x - y - borrow
        if diff < 0:
            steps.append(f"1{x}-{y}-{borrow}={diff + 10}")
            digits.append(diff + 10)
            borrow = 1
        else:
            steps.append(f"{x}-{y}-{borrow}={diff}")
            digits.append(diff)
            borrow = 0
    return steps, sum(d * 10**i for i, d in enumerate(digits))


def multiplication_steps(a: int, b: int) -> tuple[list[str], int]:
    """Long multiplication by partial products: `a*b_j0..0=p_j` per digit of b (least significant first), then
    `p_0+p_1+...=total` when there is more than one partial product."""
    steps, partials = [], []
    for j, digit in enumerate(_digits_lsb_first(b, len(str(b)))):
        place = digit * 10**j
        partials.append(a * place)
        steps.append(f"{a}*{digit}{'0' * j}={a * place}")
    total = sum(partials)
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={total}")
    return steps, total


class ArithmeticTask(_HashSplitTask):
    """Integer arithmetic with written-out column steps, sized for a tiny transformer to learn on CPU.

    Prompt `23+58`; completion `<think> 3+8+0=11 , 2+5+1=8 </think> <answer> 81 </answer>`: one step per
    column, least significant first, carry always written, so every step has the same shape. Subtraction
    (`a-b`, a >= b) writes `1x-y-borrow=d` when a column borrows; multiplication writes partial products
    (`23*8=184 , 23*50=1150 , 184+1150=1334`).

    Args:
      num_digits: digits per operand, an int or an inclusive (min, max) range; 1 digit includes 0.
      operations: any of "+", "-", "*".
      num_operands: operands per problem, int or inclusive range; applies to "+", while "-" and "*" problems
        always have two operands.
      seed: which problems each split draws, and their order.
      test_fraction: share of the problem space assigned to the test split.
      max_enumerate: problem spaces up to this size are enumerated (uniform over problems, exact "not enough
        problems" errors); larger ones are sampled (operation, operand count and digit count uniform, then the
        values), with duplicates dropped.
      pad_operands: write every operand in the prompt zero-padded to the maximum digit count (`07+45`), so
        column i of every operand sits at a fixed offset: the digit lookup a tiny model struggles with becomes
        positional, and what is left to learn is the column sums and carries. Problems and splits are the same
        either way; only the prompt text changes.
    """

    name = "arithmetic"

    def __init__(
        self,
        num_digits: int | Sequence[int] = (1, 2),
        operations: Sequence[str] = ("+",),
        num_operands: int | Sequence[int] = 2,
        seed: int = 0,
        test_fraction: float = 0.1,
        max_enumerate: int = 200_000,
        pad_operands: bool = False,
    ):
        super().__init__(seed=seed, test_fraction=test_fraction, max_enumerate=max_enumerate)
        self.pad_operands = bool(pad_operands)
        self.num_digits = _inclusive_range(num_digits, "num_digits")
        self.num_operands = _inclusive_range(num_operands, "num_operands")
        if self.num_operands[0] < 2:
            raise ValueError(f"num_operands must be >= 2; got {num_operands!r}.")
        bad = [op for op in operations if op not in ("+", "-", "*")]
        if bad or not operations:
            raise ValueError(f"operations must be a non-empty subset of ('+', '-', '*'); got {operations!r}.")
        self.operations = tuple(dict.fromkeys(operations))
        self._low = 0 if self.num_digits[0] == 1 else 10 ** (self.num_digits[0] - 1)
        self._high = 10 ** self.num_digits[1] - 1

    def _operand_counts(self, op: str) -> range:
        return range(self.num_operands[0], self.num_operands[1] + 1) if op == "+" else range(2, 3)

    def _space_size(self) -> int:
        n = self._high - self._low + 1
        total = 0
        for op in self.operations:
            for k in self._operand_counts(op):
                total += n * (n + 1) // 2 if op == "-" else n**k
        return total

    def _enumerate(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        values = range(self._low, self._high + 1)
        for op in self.operations:
            for k in self._operand_counts(op):
                for operands in itertools.product(values, repeat=k):
                    if op != "-" or operands[0] >= operands[1]:
                        yield op, operands

    def _sample(self, rng: np.random.Generator) -> tuple[str, tuple[int, ...]]:
        op = self.operations[rng.integers(len(self.operations))]
        counts = self._operand_counts(op)
        k = counts[rng.integers(len(counts))]
        operands = []
        for _ in range(k):
            digits = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
            low = 0 if digits == 1 else 10 ** (digits - 1)
            operands.append(int(rng.integers(low, 10**digits)))
        if op == "-":
            operands.sort(reverse=True)
        return op, tuple(operands)

    def _canonical(self, problem: tuple[str, tuple[int, ...]]) -> str:
        op, operands = problem
        if op in "+*":
            operands = sorted(operands)
        return op.join(map(str, operands))

    def _example(self, problem: tuple[str, tuple[int, ...]]) -> Example:
        op, operands = problem
        if op == "+":
            steps, result = addition_steps(operands)
        elif op == "-":
            steps, result = subtraction_steps(*operands)
        else:
            steps, result = multiplication_steps(*operands)
        answer = str(result)
        width = self.num_digits[1] if self.pad_operands else 0
        return {
            "prompt": op.join(str(x).zfill(width) for x in operands),
            "answer": answer,
            "completion": _r1_completion(steps, answer),
            "task": self.name,
            "operation": op,
            "operands": list(operands),
        }


# --------------------------------------------------------------------------------------------------
# Multiplication with a calculator tool
# --------------------------------------------------------------------------------------------------

DEMONSTRATIONS = ("tool", "steps", "answer")


def tool_symbols(fmt: ToolFormat = ToolFormat()) -> tuple[str, ...]:
    """The tags of a tool-call format, each to be one token: `</tool_call>` is the token that pauses a row
    of a multi-turn rollout (grpo_jax/rollout/turns.py)."""
    return (fmt.call_open, fmt.call_close, fmt.response_open, fmt.response_close)


class MultiplicationTask(_HashSplitTask):
    """`a*b` with a 3-4 digit `a` and a 2-3 digit `b` (by default): beyond what the tiny model computes
    alone, one call for a calculator (docs/ARCHITECTURE.md, "Tool use").

    Prompt `347*29`, answer `10063`. `demonstration` picks the SFT completion:
      "tool"    `<tool_call>{"name": "calculator", "arguments": {"expression": "347*29"}}</tool_call>` (the
                call, trained), `\n<tool_response>10063</tool_response>\n` (the observation exactly as the
                `calculator` environment renders it, loss-masked), `<answer> 10063 </answer>` (trained);
                its `completion_segments` say which is which.
      "steps"   the no-tool baseline with written work: ArithmeticTask's partial products,
                `<think> 347*9=3123 , 347*20=6940 , 3123+6940=10063 </think> <answer> 10063 </answer>`.
      "answer"  the no-tool baseline without work: `<answer> 10063 </answer>`.
    The problems and splits do not depend on `demonstration`, so every flavour is judged on the same
    held-out problems. Splits by the hash of `min*max` (operand order removed), as ArithmeticTask's.

    Args:
      a_digits, b_digits: digits of the first and second operand, an int or an inclusive (min, max) range;
        each problem draws a digit count uniformly, then the value.
      demonstration: one of DEMONSTRATIONS.
      seed, test_fraction: as for every task.
    """

    name = "multiplication"

    def __init__(
        self,
        a_digits: int | Sequence[int] = (3, 4),
        b_digits: int | Sequence[int] = (2, 3),
        demonstration: str = "tool",
        seed: int = 0,
        test_fraction: float = 0.1,
    ):
        super().__init__(seed=seed, test_fraction=test_fraction, max_enumerate=0)
        self.a_digits = _inclusive_range(a_digits, "a_digits")
        self.b_digits = _inclusive_range(b_digits, "b_digits")
        if demonstration not in DEMONSTRATIONS:
            raise ValueError(f"demonstration must be one of {DEMONSTRATIONS}; got {demonstration!r}.")
        self.demonstration = demonstration
        self.fmt = ToolFormat()  # the calculator environment's default ("plain") format
        self.calculator = Calculator()
        if demonstration == "tool":
            self.special_symbols = (*R1_SPECIAL_SYMBOLS, *tool_symbols(self.fmt))

    @staticmethod
    def _draw(rng: np.random.Generator, digits: tuple[int, int]) -> int:
        count = int(rng.integers(digits[0], digits[1] + 1))
        return int(rng.integers(0 if count == 1 else 10 ** (count - 1), 10**count))

    def _sample(self, rng: np.random.Generator) -> tuple[int, int]:
        return self._draw(rng, self.a_digits), self._draw(rng, self.b_digits)

    def _canonical(self, problem: tuple[int, int]) -> str:
        return "*".join(map(str, sorted(problem)))

    def _dedupe_key(self, problem: tuple[int, int]) -> str:
        return self._canonical(problem)

    def _example(self, problem: tuple[int, int]) -> Example:
        a, b = problem
        expression = f"{a}*{b}"
        answer = str(a * b)
        final = f"<answer> {answer} </answer>"
        example = {"prompt": expression, "answer": answer, "task": self.name, "operation": "*"}
        example["operands"] = [a, b]
        if self.demonstration == "tool":
            call = format_call(self.calculator.name, {"expression": expression}, self.fmt)
            observation = format_observation(self.calculator({"expression": expression}), self.fmt)
            segments = [(call, True), (observation, False), (final, True)]
            example["completion"] = "".join(text for text, _ in segments)
            example["completion_segments"] = segments
        elif self.demonstration == "steps":
            steps, _ = multiplication_steps(a, b)
            example["completion"] = _r1_completion(steps, answer)
        else:
            example["completion"] = final
        return example


# --------------------------------------------------------------------------------------------------
# Countdown
# --------------------------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an arithmetic expression of integers, + - * / and parentheses; ValueError otherwise."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expression!r}")
            return _AST_OPS[type(node.op)](left, right)
        raise ValueError(f"unsupported syntax in {expression!r}")

    return value(tree.body)


def countdown_solution_is_valid(expression: str, numbers: Sequence[int], target: int) -> bool:
    """True if `expression` uses each of `numbers` exactly once (as a multiset) and equals `target`."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        used = sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))
        return used == sorted(numbers) and evaluate_expression(expression) == target
    except (ValueError, SyntaxError, TypeError):
        return False


class CountdownTask(_HashSplitTask):
    """Countdown as in TinyZero: reach `target` with + - * / using each given number exactly once.

    Problems are made by drawing the numbers and combining them at random (every intermediate a positive
    integer, divisions exact) until the result lands in [1, max_target]; that construction is the known
    solution stored as `answer`. Any valid expression is a correct answer (see `countdown_solution_is_valid`).

    `demonstration` picks the SFT completion (the problems and splits do not depend on it):
      "steps"   (default) the construction's steps, R1 format:
                `<think> 44-19=25 , 25*3=75 , 75+7=82 </think> <answer> (44-19)*3+7 </answer>`.
      "tool"    a call of the `python` tool whose code is `solve([44, 19, 3, 7], 82)` (trained; `solve` is
                the tool's prelude, `data/countdown_program.py`), the observation exactly as the
                `python_countdown` environment renders that program's output
                (`\n<tool_response>7+3*(44-19)</tool_response>\n`, loss-masked), and the expression it found
                as the answer, `<answer> 7+3*(44-19) </answer>` (trained); `completion_segments` say which is
                which.
      "answer"  the bare answer, `<answer> (44-19)*3+7 </answer>`.
    """

    name = "countdown"

    def __init__(
        self,
        num_numbers: int | Sequence[int] = (3, 4),
        min_number: int = 1,
        max_number: int = 100,
        max_target: int = 100,
        demonstration: str = "steps",
        seed: int = 0,
        test_fraction: float = 0.1,
    ):
        super().__init__(seed=seed, test_fraction=test_fraction, max_enumerate=0)
        if demonstration not in DEMONSTRATIONS:
            raise ValueError(f"demonstration must be one of {DEMONSTRATIONS}; got {demonstration!r}.")
        self.demonstration = demonstration
        self.fmt = ToolFormat()  # the python_countdown environment's default ("plain") format
        if demonstration == "tool":
            self.special_symbols = (*R1_SPECIAL_SYMBOLS, *tool_symbols(self.fmt))
        self.num_numbers = _inclusive_range(num_numbers, "num_numbers")
        if self.num_numbers[0] < 2:
            raise ValueError(f"num_numbers must be >= 2; got {num_numbers!r}.")
        if not 1 <= min_number <= max_number:
            raise ValueError(f"need 1 <= min_number <= max_number; got {min_number}, {max_number}.")
        self.min_number, self.max_number, self.max_target = int(min_number), int(max_number), int(max_target)

    def _sample(self, rng: np.random.Generator) -> tuple[tuple[int, ...], int, str, tuple[str, ...]] | None:
        count = int(rng.integers(self.num_numbers[0], self.num_numbers[1] + 1))
        numbers = tuple(int(x) for x in rng.integers(self.min_number, self.max_number + 1, size=count))
        pool = [(n, str(n), 3) for n in numbers]  # (value, text, precedence of its top operator)
        steps = []
        while len(pool) > 1:
            i, j = rng.choice(len(pool), size=2, replace=False)
            (a, a_text, a_prec), (b, b_text, b_prec) = pool[i], pool[j]
            if a < b:
                (a, a_text, a_prec), (b, b_text, b_prec) = (b, b_text, b_prec), (a, a_text, a_prec)
            choices = ["+", "*"] + (["-"] if a > b else []) + (["/"] if a % b == 0 else [])
            op = choices[rng.integers(len(choices))]
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            prec = _PRECEDENCE[op]
            left = f"({a_text})" if a_prec < prec else a_text
            right = f"({b_text})" if b_prec < prec or (b_prec == prec and op in "-/") else b_text
            steps.append(f"{a}{op}{b}={value}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"{left}{op}{right}", prec)]
        target, expression, _ = pool[0]
        if not 1 <= target <= self.max_target:
            return None
        return numbers, target, expression, tuple(steps)

    def _canonical(self, problem) -> str:
        numbers, target = problem[0], problem[1]
        return f"countdown:{','.join(map(str, sorted(numbers)))}->{target}"

    def _dedupe_key(self, problem) -> str:
        return self._canonical(problem)

    def _example(self, problem) -> Example:
        numbers, target, expression, steps = problem
        prompt = (
            f"Using the numbers {list(numbers)}, create an equation that equals {target}. You can use basic "
            "arithmetic operations (+, -, *, /) and each number can only be used once."
        )
        example = {
            "prompt": prompt,
            "answer": expression,
            "completion": _r1_completion(steps, expression),
            "task": self.name,
            "numbers": list(numbers),
            "target": target,
        }
        if self.demonstration == "tool":
            example["completion_segments"] = countdown_tool_segments(numbers, target, self.fmt)
            example["completion"] = "".join(text for text, _ in example["completion_segments"])
        elif self.demonstration == "answer":
            example["completion"] = f"<answer> {expression} </answer>"
        return example


def countdown_tool_segments(
    numbers: Sequence[int], target: int, fmt: ToolFormat = ToolFormat()
) -> list[tuple[str, bool]]:
    """A Countdown tool demonstration: [(the python call, True), (its observation, False), (the answer,
    True)]. The observation is the python tool's rendering (`PythonTool.render`) of what the call's program
    prints (`countdown_program.expected_output`), wrapped as the environment wraps it (`format_observation`);
    the answer is the expression found (`<answer> none </answer>` for an unsolvable problem)."""
    code = countdown_program.call_code(numbers, target)
    stdout = countdown_program.expected_output(numbers, target)
    result = SandboxResult(
        stdout=stdout,
        stderr="",
        returncode=0,
        timed_out=False,
        output_truncated=False,
        backend="",
        wall_s=0.0,
    )
    call = format_call("python", {"code": code}, fmt)
    observation = format_observation(PythonTool().render(result), fmt)
    return [(call, True), (observation, False), (f"<answer> {stdout.strip()} </answer>", True)]


TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "multiplication": MultiplicationTask}


def task_special_symbols(name: str, kwargs: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The user-defined symbols an in-process tokenizer for task `name` (built with `kwargs`) must hold as
    single tokens: the task's `special_symbols` (the R1 tags, plus the tool tags for tool demonstrations);
    the R1 tags for a file task (gsm8k, math). Bad kwargs raise as building the task does."""
    if name not in TASKS:
        return R1_SPECIAL_SYMBOLS
    return tuple(TASKS[name](**dict(kwargs or {})).special_symbols)
