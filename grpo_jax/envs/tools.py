"""Tools a model can call, registered by name (docs/ARCHITECTURE.md, "Tool use").

A tool is a picklable callable `tool(arguments: dict) -> str` with `name`, `description` and `parameters`
(a JSON schema, as chat templates list tools). It raises `ToolError(kind, message)` for a call it cannot
serve; any other exception counts as kind "tool_error". Both become an error observation for the model,
never an exception in the caller (`envs/base.py:run_tool_call`).

  calculator  {"expression": "2 * (3 + 4) ** 2"}: a real arithmetic parser (`ast.parse(mode="eval")`,
              walking only numbers, + - * / // % **, unary +/- and parentheses), no `eval`; limits on
              the expression's length, the exponent and the size of every intermediate result.
  python      {"code": "print(1 + 1)"}: the code runs in the subprocess sandbox of `envs/sandbox.py`;
              the observation is its stdout, then its stderr, then a note of a non-zero exit. Option
              `prelude`: source run before every call's code in the same program (e.g. a helper the
              model calls, `solve(nums, target)` of `data/countdown_program.py`), never shown to it.

A new tool: a factory `make(**options) -> tool` decorated with `@register_tool("name")`;
`make_tool(name, **options)` builds one (unknown names and options fail in one line).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import operator
import signal
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from grpo_jax.envs import sandbox


class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]

    def __call__(self, arguments: Mapping[str, Any]) -> str: ...


class ToolError(Exception):
    """A call the tool cannot serve; `kind` is one of tool_format.ERROR_KINDS (default "tool_error")."""

    def __init__(self, message: str, kind: str = "tool_error"):
        super().__init__(message)
        self.kind = kind


ToolFactory = Callable[..., Tool]
TOOLS: dict[str, ToolFactory] = {}


def register_tool(name: str) -> Callable[[ToolFactory], ToolFactory]:
    """Decorator: register `factory(**options) -> tool` under `name`."""

    def decorate(factory: ToolFactory) -> ToolFactory:
        existing = TOOLS.get(name)
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            raise ValueError(f"tool {name!r} is already registered by {existing.__module__}")
        TOOLS[name] = factory
        return factory

    return decorate


def make_tool(name: str, **options) -> Tool:
    """Build one registered tool. Unknown name or option -> ValueError listing the known ones."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; known: {sorted(TOOLS)}")
    factory = TOOLS[name]
    accepted = {p.name for p in inspect.signature(factory).parameters.values()}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"tool {name!r}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    return factory(**options)


def _string_argument(arguments: Mapping[str, Any], key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str):
        raise ToolError(f'missing string argument "{key}"', kind="bad_arguments")
    return value


# ---------------------------------------------------------------------------------------------------------
# calculator
# ---------------------------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@dataclasses.dataclass(frozen=True)
class Calculator:
    """Safe arithmetic: numbers, + - * / // % **, unary +/-, parentheses (Python's precedence and
    semantics: `/` is true division). `max_length` characters, |exponent| <= `max_exponent`, and no
    intermediate result beyond `max_digits` decimal digits (so `9**9**9` is refused before it is computed)."""

    max_length: int = 200
    max_exponent: int = 1000
    max_digits: int = 1000
    name: str = "calculator"
    description: str = "Evaluates an arithmetic expression: numbers, + - * / // % ** and parentheses."
    parameters: dict = dataclasses.field(
        default_factory=lambda: {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2 ** 3"}},
            "required": ["expression"],
        }
    )

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        expression = _string_argument(arguments, "expression")
        return _format_number(self.evaluate(expression))

    def evaluate(self, expression: str) -> int | float:
        if len(expression) > self.max_length:
            raise ToolError(f"expression longer than {self.max_length} characters")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
            raise ToolError(f"not an arithmetic expression: {type(error).__name__}") from None
        try:
            return self._eval(tree.body)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except (OverflowError, RecursionError, MemoryError) as error:
            raise ToolError(f"result out of range ({type(error).__name__})") from None

    def _check_size(self, value: int | float) -> int | float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError("result out of range (not finite)")
        if isinstance(value, int) and value and math.log10(abs(value)) > self.max_digits:
            raise ToolError(f"result longer than {self.max_digits} digits")
        return value

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):  # bool, complex, str, None, ...: not arithmetic
                raise ToolError(f"unsupported literal {node.value!r}")
            return self._check_size(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(right) > self.max_exponent:
                    raise ToolError(f"exponent {right} beyond +-{self.max_exponent}")
                if left and abs(right) * math.log10(abs(left)) > self.max_digits:
                    raise ToolError(f"result longer than {self.max_digits} digits")
                if isinstance(left, (int, float)) and left < 0 and not float(right).is_integer():
                    raise ToolError("fractional power of a negative number")
            return self._check_size(_BINARY[type(node.op)](left, right))
        raise ToolError(f"unsupported syntax: {type(node).__name__}")


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


@register_tool("calculator")
def make_calculator(max_length: int = 200, max_exponent: int = 1000, max_digits: int = 1000) -> Calculator:
    return Calculator(max_length=max_length, max_exponent=max_exponent, max_digits=max_digits)


# ---------------------------------------------------------------------------------------------------------
# python
# ---------------------------------------------------------------------------------------------------------

_LIMIT_SIGNALS = {
    int(signal.SIGXCPU): "CPU time limit",
    int(signal.SIGXFSZ): "file size limit",
    int(signal.SIGKILL): "killed",
    int(signal.SIGSEGV): "segmentation fault",
}


@dataclasses.dataclass(frozen=True)
class PythonTool:
    """Runs model-written Python in the sandbox (`envs/sandbox.py`); fails closed where none works unless
    `allow_unsandboxed`. The observation: stdout, then `[stderr]` and stderr, then `[exit status N]`
    (`render`). `prelude`: source prepended to every call's code (the program is `prelude + "\n" + code`:
    definitions the model may call without writing them; a traceback's line numbers count the prelude's)."""

    limits: sandbox.SandboxLimits = sandbox.SandboxLimits()
    allow_unsandboxed: bool = False
    backend: str | None = None
    prelude: str = ""
    name: str = "python"
    description: str = (
        "Runs a Python program (standard library only, no network, no files) and returns its output."
    )
    parameters: dict = dataclasses.field(
        default_factory=lambda: {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "a Python program; print the result"}},
            "required": ["code"],
        }
    )

    def check_available(self) -> None:
        """Raises SandboxUnavailable (one line) where model code would run unisolated without an opt-in."""
        if self.backend is None and not self.allow_unsandboxed:
            chosen = sandbox.isolation()
            if chosen.backend is None:
                raise sandbox.SandboxUnavailable(f"python tool refuses to run model code: {chosen.reason}")

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        code = _string_argument(arguments, "code")
        if self.prelude:
            code = f"{self.prelude}\n{code}"
        try:
            result = sandbox.run_python(
                code, limits=self.limits, allow_unsandboxed=self.allow_unsandboxed, backend=self.backend
            )
        except sandbox.SandboxUnavailable as error:
            raise ToolError(str(error), kind="sandbox_unavailable") from None
        return self.render(result)

    def render(self, result: sandbox.SandboxResult) -> str:
        """The tool's answer for a finished run (a time-out raises ToolError "timeout"); tasks build their
        demonstrations' observations with it, from the output their program is known to print."""
        if result.timed_out:
            raise ToolError(f"timed out after {self.limits.wall_time_s} s; killed", kind="timeout")
        parts = [result.stdout]
        if result.stderr:
            parts.append(f"[stderr]\n{result.stderr}")
        if result.output_truncated:
            parts.append(f"[output beyond {self.limits.max_output_bytes} bytes cut; run killed]")
        elif result.returncode:
            why = _LIMIT_SIGNALS.get(result.returncode - 128) if result.returncode > 128 else None
            parts.append(f"[exit status {result.returncode}{f': {why}' if why else ''}]")
        return "\n".join(p.rstrip("\n") for p in parts if p)


@register_tool("python")
def make_python_tool(
    wall_time_s: float = 5.0,
    cpu_time_s: int = 5,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_output_bytes: int = 64 * 2**10,
    allow_unsandboxed: bool = False,
    backend: str | None = None,
    prelude: str = "",
) -> PythonTool:
    limits = sandbox.SandboxLimits(
        wall_time_s=wall_time_s,
        cpu_time_s=cpu_time_s,
        memory_bytes=memory_mb * 2**20,
        max_processes=max_processes,
        max_output_bytes=max_output_bytes,
    )
    if not isinstance(prelude, str):
        raise ValueError(
            f"python tool: prelude must be a string of Python source, got {type(prelude).__name__}"
        )
    return PythonTool(limits=limits, allow_unsandboxed=allow_unsandboxed, backend=backend, prelude=prelude)
