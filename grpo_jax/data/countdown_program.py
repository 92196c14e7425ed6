"""The program behind Countdown's `python` tool demonstrations (`CountdownTask(demonstration="tool")`,
configs/tool_python_countdown.py; docs/ARCHITECTURE.md, "Tool use").

A tiny model learns to write a short call, not a search: the python tool of the `python_countdown`
environment is configured with `PRELUDE` (the source of `solve` below, the tool's `prelude` option), so the
model's code is one line, `solve([44, 19, 3, 7], 82)`: the prompt's list and target copied verbatim. `solve`
prints the first expression it finds (depth-first over pairs in the given order), or `none`.

`expected_output(numbers, target)` is what that program prints, computed here by the same function, so a
demonstration's observation is known without starting a sandbox per example; tests/test_tool_countdown.py
checks it against the real tool.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Sequence


def solve(nums, target):
    """Prints an expression over `nums` (each once; + - * / with every intermediate a positive integer,
    as CountdownTask builds its problems, so one is always found for them) equal to `target`, or `none`.
    Self-contained (it runs in the sandbox as the python tool's prelude): no imports, no globals."""

    def search(items):  # items: [(value, text, precedence of its top operator)]
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i, (a, a_text, a_prec) in enumerate(items):
            for j, (b, b_text, b_prec) in enumerate(items):
                if i == j:
                    continue
                rest = [item for k, item in enumerate(items) if k not in (i, j)]
                for op, prec, ok in (
                    ("+", 1, i < j),
                    ("*", 2, i < j),
                    ("-", 1, a > b),
                    ("/", 2, b > 0 and a % b == 0),
                ):
                    if not ok:
                        continue
                    value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
                    left = f"({a_text})" if a_prec < prec else a_text
                    right = f"({b_text})" if b_prec < prec or (b_prec == prec and op in "-/") else b_text
                    found = search([*rest, (value, f"{left}{op}{right}", prec)])
                    if found is not None:
                        return found
        return None

    print(search([(n, str(n), 3) for n in nums]) or "none")


PRELUDE = inspect.getsource(solve)


def call_code(numbers: Sequence[int], target: int) -> str:
    """The code of a demonstration's call: `solve([44, 19, 3, 7], 82)` (the prompt's spelling of both)."""
    return f"solve({list(numbers)}, {target})"


def expected_output(numbers: Sequence[int], target: int) -> str:
    """What `PRELUDE + call_code(numbers, target)` prints (stdout, with its newline)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        solve(list(numbers), target)
    return buffer.getvalue()
