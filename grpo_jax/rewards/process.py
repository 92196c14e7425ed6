"""Process supervision: a rule-based step verifier and the step rewards GRPO's process advantages take.

DeepSeekMath (arXiv 2402.03300) §4.1.3: each reasoning step j of completion i gets a reward r_{i,j} at
the token index(j) where it ends; the advantage of token t sums the group-normalised rewards of the steps
ending at or after t (`grpo_jax.algorithms.advantages.process_advantages`).

Here a rule-based verifier stands in for the paper's process reward model: for the synthetic arithmetic
task every step of the written chain (`<think> 3+8+0=11 , 2+5+1=8 </think> <answer> 81 </answer>`) can
be checked exactly. `verify_arithmetic_steps(text, example)` judges one decoded completion and returns
`StepCheck`s whose `end` is a character offset; `process_step_rewards(tokenizer, tokens, mask, examples,
max_steps=S)` runs a verifier over a batch on the host and maps each step's end to the completion token
where it ends, giving the `step_rewards`, `step_mask` and `step_end_index` arrays `[N, S]` that the GRPO
step reads when `advantage_estimator="process"`. `STEP_VERIFIERS` names verifiers for configs
(`config.grpo.step_verifier = "arithmetic"`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


class StepCheck(NamedTuple):
    """One judged step of a completion.

    end: character offset just past the step's last character in the completion text (exclusive end).
    reward: the step's reward (the verifier's `correct_reward` or `wrong_reward`).
    correct: whether the step is right.
    kind: "step" (a written step), "missing" (the chain stopped short), "extra" (a step past the last
      one the problem needs), or "answer" (the `<answer>` content against the gold answer).
    """

    end: int
    reward: float
    correct: bool
    kind: str


StepVerifier = Callable[[str, Mapping[str, Any]], Sequence[StepCheck]]

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_AROUND_OPERATORS = re.compile(r"\s*([-+*=])\s*")
_ADDITION = re.compile(r"\d+(?:\+\d+)+=\d+")
_SUBTRACTION = re.compile(r"\d+-\d+-\d+=\d+")
_PRODUCT = re.compile(r"\d+\*\d+=\d+")
CARRY_SOURCES = ("written", "gold")


# --------------------------------------------------------------------------------------------------
# The arithmetic verifier.
# --------------------------------------------------------------------------------------------------


def _problem(example: Mapping[str, Any]) -> tuple[str, list[int], str]:
    """(operation, operands, gold answer) of an ArithmeticTask example; the prompt is parsed when the
    example carries no `operation`/`operands` fields (e.g. one read back from JSONL)."""
    operation = example.get("operation")
    operands = example.get("operands")
    if operation is None or operands is None:
        prompt = str(example.get("prompt", "")).strip()
        match = re.fullmatch(r"\d+(?:\s*([-+*/])\s*\d+)+", prompt)
        if not match:
            raise ValueError(f"verify_arithmetic_steps: cannot read an arithmetic problem from {prompt!r}")
        operation = match.group(1)
        operands = [int(x) for x in re.split(r"\s*[-+*/]\s*", prompt)]
    operands = [int(x) for x in operands]
    if operation not in ("+", "-", "*"):
        raise ValueError(
            f"verify_arithmetic_steps: unsupported operation {operation!r} (supported: '+', '-', '*')"
        )
    if operation != "+" and len(operands) != 2:
        raise ValueError(f"verify_arithmetic_steps: {operation!r} takes two operands, got {operands}")
    gold = example.get("answer")
    if gold is None:
        a, b = operands[0], operands[1] if len(operands) > 1 else 0
        gold = sum(operands) if operation == "+" else a - b if operation == "-" else a * b
    return operation, operands, str(gold).strip()


def _digit(value: int, i: int) -> int:
    return (value // 10**i) % 10


def _number(digits: str) -> int | None:
    """int of a written number, None past 100 digits (a runaway sample; int() refuses > 4300 digits)."""
    return int(digits) if len(digits) <= 100 else None


def _addition_checks(steps: list[str], operands: list[int], use_gold: bool) -> tuple[list[bool], int]:
    """Column i (least significant first) must read `d_1+...+d_k+c=s` with d_j the i-th digit of operand
    j, c the carry into the column, s their sum; returns (correct per written step, columns needed)."""
    width = max(len(str(x)) for x in operands)
    verdicts, gold_carry, written_carry = [], 0, 0
    for i, step in enumerate(steps):
        digits = [_digit(x, i) for x in operands]
        carry = gold_carry if use_gold or written_carry is None else written_carry
        ok = False
        if i < width and _ADDITION.fullmatch(step):
            left, total = step.split("=")
            terms = left.split("+")
            expected = [str(d) for d in digits] + [str(carry)]
            ok = terms == expected and total == str(sum(digits) + carry)
        written = _number(step.split("=")[1]) if _ADDITION.fullmatch(step) else None
        written_carry = None if written is None else written // 10
        gold_carry = (sum(digits) + gold_carry) // 10
        verdicts.append(ok)
    return verdicts, width


def _subtraction_checks(steps: list[str], operands: list[int], use_gold: bool) -> tuple[list[bool], int]:
    """Column i of a-b must read `x-y-b=d` or, when it borrows, `1x-y-b=d` (see `subtraction_steps`):
    x, y the i-th digits, b the borrow into the column, d the column's digit of the difference."""
    a, b = operands
    width = len(str(a))
    verdicts, gold_borrow, written_borrow = [], 0, 0
    for i, step in enumerate(steps):
        x, y = _digit(a, i), _digit(b, i)
        borrow = gold_borrow if use_gold or written_borrow is None else written_borrow
        borrows = x - y - borrow < 0
        ok = False
        if i < width and _SUBTRACTION.fullmatch(step):
            left, result = step.split("=")
            top, bottom, borrow_in = left.split("-")
            expected_top = f"1{x}" if borrows else str(x)
            ok = (top, bottom, borrow_in) == (expected_top, str(y), str(borrow))
            ok = ok and result == str(x - y - borrow + (10 if borrows else 0))
        if _SUBTRACTION.fullmatch(step):
            top = step.split("-")[0]
            written_borrow = 1 if len(top) == 2 and top.startswith("1") else 0
        else:
            written_borrow = None
        gold_borrow = 1 if x - y - gold_borrow < 0 else 0
        verdicts.append(ok)
    return verdicts, width


def _multiplication_checks(steps: list[str], operands: list[int], use_gold: bool) -> tuple[list[bool], int]:
    """Step j < digits(b) must read `a*f=p` with f the j-th digit of b times 10^j (`23*50=1150`) and
    p = a*f; with more than one partial product a last step `p_0+p_1+...=total` adds them."""
    a, b = operands
    num_partials = len(str(b))
    gold_partials = [a * _digit(b, j) * 10**j for j in range(num_partials)]
    written_partials: list[int | None] = []
    needed = num_partials + (1 if num_partials > 1 else 0)
    verdicts = []
    for j, step in enumerate(steps):
        ok = False
        if j < num_partials:
            if _PRODUCT.fullmatch(step):
                left, product = step.split("=")
                factor_a, factor_b = left.split("*")
                place = f"{_digit(b, j)}{'0' * j}"
                ok = (factor_a, factor_b, product) == (str(a), place, str(gold_partials[j]))
                written_partials.append(_number(product))
            else:
                written_partials.append(None)
        elif j == num_partials and num_partials > 1 and _ADDITION.fullmatch(step):
            left, total = step.split("=")
            inputs = [
                w if w is not None and not use_gold else g for w, g in zip(written_partials, gold_partials)
            ]
            ok = left.split("+") == [str(p) for p in inputs] and total == str(sum(inputs))
        verdicts.append(ok)
    return verdicts, needed


_CHECKS = {"+": _addition_checks, "-": _subtraction_checks, "*": _multiplication_checks}


def verify_arithmetic_steps(
    text: str,
    example: Mapping[str, Any],
    *,
    correct_reward: float = 1.0,
    wrong_reward: float = 0.0,
    carry_from: str = "written",
) -> list[StepCheck]:
    """Judge each step of an arithmetic completion; never raises on malformed text.

    The chain is the `<think> … </think>` content split at commas (empty pieces skipped); step i is
    checked against column i of `addition_steps` / `subtraction_steps` / `multiplication_steps`
    (grpo_jax.data.tasks), spaces around operators ignored. A step is correct only if every part of it
    is: the operands' digits, the carry (borrow, partial products) it takes from earlier steps, and its
    result. Then, in text order:
      * one "step" check per written step, ending after its last character;
      * steps past the number the problem needs are "extra" (wrong);
      * a chain shorter than needed gets one wrong "missing" check ending at `</think>` (or, with no think
        block, where `<answer>` starts, else at the end of the text), so skipping columns is never free;
      * one "answer" check, correct iff the first `<answer>` after the chain equals `example["answer"]`
        (stripped), ending after `</answer>` (or at the end of the text when there is none).

    carry_from: "written" takes the carry into column i from step i-1 as written (its result // 10; a
      borrow is the `1x` form; the final sum adds the partial products written): one slip costs one step,
      not every step after it, so the credit lands on the step that erred. An unreadable previous step
      falls back to the true value. "gold" compares every step with the reference chain.

    Raises ValueError only for an example it cannot read or an unsupported operation (countdown, "/").
    """
    if carry_from not in CARRY_SOURCES:
        raise ValueError(f"carry_from must be one of {CARRY_SOURCES}, got {carry_from!r}")
    operation, operands, gold = _problem(example)

    def check(end: int, correct: bool, kind: str) -> StepCheck:
        return StepCheck(int(end), float(correct_reward if correct else wrong_reward), bool(correct), kind)

    checks: list[StepCheck] = []
    think = _THINK.search(text)
    answer = _ANSWER.search(text, think.end() if think else 0)
    steps, ends = [], []
    if think:
        start = think.start(1)
        for piece in re.finditer(r"[^,]+", think.group(1)):
            stripped = piece.group().strip()
            if stripped:
                steps.append(_AROUND_OPERATORS.sub(r"\1", stripped))
                ends.append(start + piece.start() + len(piece.group().rstrip()))
    verdicts, needed = _CHECKS[operation](steps, operands, carry_from == "gold")
    for i, (ok, end) in enumerate(zip(verdicts, ends)):
        checks.append(check(end, ok, "step" if i < needed else "extra"))
    if len(steps) < needed:
        chain_end = think.end() if think else answer.start() if answer else len(text)
        checks.append(check(chain_end, False, "missing"))
    if answer:
        checks.append(check(answer.end(), answer.group(1).strip() == gold, "answer"))
    else:
        checks.append(check(len(text), False, "answer"))
    return checks


STEP_VERIFIERS: dict[str, StepVerifier] = {"arithmetic": verify_arithmetic_steps}


# --------------------------------------------------------------------------------------------------
# Character offsets -> completion token indices, and the batch arrays.
# --------------------------------------------------------------------------------------------------


def _token_char_ends(tokenizer, ids: list[int], text: str, piece_text: dict[int, str]) -> np.ndarray | None:
    """[n] character end (exclusive) of each token's text within `text` = decode(ids, skip_special=True),
    from the tokens' pieces (SentencePiece `▁` = space, control tokens empty, the leading space of the
    text dropped as SentencePiece does); None when the pieces do not spell `text` (byte fallback, unk,
    a byte-level BPE), and the caller decodes prefixes instead."""
    lengths = []
    for i in ids:
        if i not in piece_text:
            piece = tokenizer.id_to_piece(i).replace("▁", " ")
            dropped = bool(piece.strip()) and tokenizer.decode([i], skip_special=True) == ""  # control token
            piece_text[i] = "" if dropped else piece
        lengths.append(len(piece_text[i]))
    joined = "".join(piece_text[i] for i in ids)
    if joined != text:
        if not (joined.startswith(" ") and joined[1:] == text):
            return None
        first = next(k for k, n in enumerate(lengths) if n)
        lengths[first] -= 1
    return np.cumsum(np.asarray(lengths, np.int64))


def _char_ends_to_tokens(
    tokenizer, ids: list[int], text: str, char_ends: list[int], piece_text: dict[int, str]
) -> list[int]:
    """The token index (0-based, within `ids`) whose text contains character `end - 1`, per end offset:
    the first token whose decoded prefix reaches `end`. Ends past the text map to the last token."""
    if not ids:
        return [0 for _ in char_ends]
    ends = _token_char_ends(tokenizer, ids, text, piece_text)
    if ends is not None:
        return [min(int(np.searchsorted(ends, max(e, 1), side="left")), len(ids) - 1) for e in char_ends]
    # Slow path: binary search on the length of decoded prefixes (monotone up to partial UTF-8 bytes).
    cache: dict[int, int] = {}

    def prefix_len(k: int) -> int:
        if k not in cache:
            cache[k] = len(tokenizer.decode(ids[: k + 1], skip_special=True))
        return cache[k]

    out = []
    for e in char_ends:
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_len(mid) >= max(e, 1):
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def _fit_steps(checks: Sequence[StepCheck], max_steps: int) -> list[StepCheck]:
    """At most `max_steps` checks, the last one (the answer) always kept: when there are more, the checks
    from slot max_steps-2 up to the one before the last are folded into one that ends where the last of
    them ends and carries the lowest of their rewards (wrong if any of them is wrong). So no error goes
    unseen; it only loses some precision of where it sits. max_steps=1 keeps the answer check alone."""
    checks = list(checks)
    if len(checks) <= max_steps:
        return checks
    if max_steps == 1:
        return checks[-1:]
    head, folded, last = checks[: max_steps - 2], checks[max_steps - 2 : -1], checks[-1]
    worst = min(folded, key=lambda c: c.reward)
    merged = StepCheck(max(c.end for c in folded), worst.reward, all(c.correct for c in folded), "folded")
    return [*head, merged, last]


def process_step_rewards(
    tokenizer,
    completion_tokens: np.ndarray,
    completion_mask: np.ndarray,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_steps: int,
    verifier: StepVerifier = verify_arithmetic_steps,
) -> dict[str, np.ndarray]:
    """Step rewards of a batch of completions, on the host, for `advantage_estimator="process"`.

    Each row's valid tokens (`completion_mask > 0`, control tokens such as EOS dropped) are decoded and
    judged by `verifier(text, example)`; each step's end character is mapped to the completion token
    whose text contains it, except that a step ending the text (nothing but spaces after it, e.g. the
    answer step of a clean completion) ends at the row's last valid token, so the stop token is trained
    with the final step's reward rather than left with advantage 0. Steps past `max_steps` are folded so
    the last (answer) step stays (see `_fit_steps`). A verifier that raises (a data error, e.g. an
    unsupported operation) propagates.

    Args:
      completion_tokens: [N, L] int, the sampled tokens (right-padded).
      completion_mask: [N, L], 1 on generated tokens up to and including the stop token.
      examples: N dicts, one per row (prompt-major, the G rows of a prompt share its example).
      max_steps: S, the static number of step slots.

    Returns:
      step_rewards float32 [N, S], step_mask int32 [N, S] (1 on real steps; a row with none is all 0),
      step_end_index int32 [N, S] (completion token index in [0, L) where each step ends; 0 on padding).
    """
    tokens = np.asarray(completion_tokens)
    mask = np.asarray(completion_mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"completion_tokens {tokens.shape} and completion_mask {mask.shape} must be [N, L]")
    if len(examples) != tokens.shape[0]:
        raise ValueError(f"{len(examples)} examples for {tokens.shape[0]} completions; need one per row")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = tokens.shape[0]
    step_rewards = np.zeros((n, max_steps), np.float32)
    step_mask = np.zeros((n, max_steps), np.int32)
    step_end_index = np.zeros((n, max_steps), np.int32)
    piece_text: dict[int, str] = {}
    for row in range(n):
        positions = np.flatnonzero(mask[row] > 0)
        ids = [int(i) for i in tokens[row, positions]]
        text = tokenizer.decode(ids, skip_special=True)
        checks = _fit_steps(verifier(text, examples[row]), max_steps)
        if not checks:
            continue
        token_of = _char_ends_to_tokens(tokenizer, ids, text, [c.end for c in checks], piece_text)
        text_end = len(text.rstrip())
        for s, (check, k) in enumerate(zip(checks, token_of)):
            step_rewards[row, s] = check.reward
            step_mask[row, s] = 1
            if len(positions):
                step_end_index[row, s] = positions[-1] if check.end >= text_end else positions[k]
    return {"step_rewards": step_rewards, "step_mask": step_mask, "step_end_index": step_end_index}
