"""Multi-turn environments: `reset(example) -> observation`,
`step(text) -> (observation, reward, done, info)`, plain Python, registered by name
(docs/ARCHITECTURE.md, "Tool use").

An environment holds one trajectory's state in plain attributes and must be picklable: the batch runner
(`envs/runner.py`) ships it to a worker process for each step and takes the new state back, so a step that
hangs or crashes a worker costs that step only.

`ToolEnv` is the tool-use environment: each model turn either ends with a tool call (the observation is the
tool's response, reward 0, not done) or is the final answer (done; the reward is a host reward of
`rewards/host.py:HOST_REWARDS` on that turn's text). A turn limit ends the trajectory with the reward of its
last turn. Malformed calls, unknown tools and tools that raise give an error observation and are counted
(`info["tool_error"]`); nothing raises into the caller.

For the rollout side, `tool_observation(text, tools, fmt)` is the per-row pure step: the observation text to
append after a completion that ends in a tool call (None when it has none), and what happened.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grpo_jax.envs.tool_format import (
    ERROR_KINDS,
    ToolCall,
    ToolCallError,
    ToolFormat,
    format_observation,
    parse_tool_call,
)
from grpo_jax.envs.tools import Tool, ToolError, make_tool

StepResult = tuple[str, float, bool, dict[str, Any]]


class Environment:
    """Base class: one trajectory. Subclasses keep state in picklable attributes."""

    def reset(self, example: Mapping[str, Any]) -> str:
        """Starts a trajectory on `example` (a task dict: "prompt", "answer", ...); the first observation."""
        raise NotImplementedError

    def step(self, text: str) -> StepResult:
        """Takes the model's turn `text` (without its stop token): (observation, reward, done, info)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# One tool call, the rollout side's per-row step.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What a turn's tool call did: `tool` the name called (None: no parseable call), `error` a kind of
    tool_format.ERROR_KINDS or None, `message` the result or the error shown to the model."""

    tool: str | None
    error: str | None
    message: str


def run_tool_call(call: ToolCall | ToolCallError, tools: Mapping[str, Tool]) -> ToolOutcome:
    """Runs a parsed call against `tools`; every failure becomes an error outcome, never an exception."""
    if isinstance(call, ToolCallError):
        return ToolOutcome(None, call.kind, f"error ({call.kind}): {call.message}")
    tool = tools.get(call.name)
    if tool is None:
        return ToolOutcome(
            call.name, "unknown_tool", f"error (unknown_tool): no tool {call.name!r}; have {sorted(tools)}"
        )
    try:
        result = tool(call.arguments)
        if not isinstance(result, str):
            raise TypeError(f"tool returned {type(result).__name__}, not str")
    except ToolError as error:
        kind = error.kind if error.kind in ERROR_KINDS else "tool_error"
        return ToolOutcome(call.name, kind, f"error ({kind}): {error}")
    except Exception as error:  # A tool bug must not crash the rollout.
        return ToolOutcome(call.name, "tool_error", f"error (tool_error): {type(error).__name__}: {error}")
    return ToolOutcome(call.name, None, result)


def tool_observation(
    text: str, tools: Mapping[str, Tool], fmt: ToolFormat = ToolFormat()
) -> tuple[str | None, ToolOutcome | None]:
    """(text to append after the completion `text`, outcome); (None, None) if `text` has no tool call.

    The appended text is `fmt.observation_prefix + response_open + result + response_close +
    observation_suffix`, the result cut to `fmt.max_observation_chars` (tool_format.truncate_observation).
    """
    call = parse_tool_call(text, fmt)
    if call is None:
        return None, None
    outcome = run_tool_call(call, tools)
    return format_observation(outcome.message, fmt), outcome


def tool_instructions(tools: Sequence[Tool], fmt: ToolFormat = ToolFormat()) -> str:
    """A plain-text preamble listing the tools and the call format (for templates without a tools slot)."""
    specs = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in tools
    )
    example = f'{fmt.call_open}{{"name": <tool name>, "arguments": <arguments object>}}{fmt.call_close}'
    return (
        f"You may call these tools:\n{specs}\nTo call one, end your turn with {example}; the result comes "
        f"back in {fmt.response_open.strip()}{fmt.response_close.strip()}. "
        "Give the final answer without a tool call."
    )


# ---------------------------------------------------------------------------------------------------------
# The tool-use environment.
# ---------------------------------------------------------------------------------------------------------


def _host_reward(name: str) -> Callable[[str, Mapping[str, Any]], float]:
    host = importlib.import_module("grpo_jax.rewards.host")  # late: keeps `envs` free of JAX at import
    if name not in host.HOST_REWARDS:
        raise ValueError(f"env reward {name!r} is not a host reward; known: {sorted(host.HOST_REWARDS)}")
    return host.HOST_REWARDS[name]


class ToolEnv(Environment):
    """Tool use over several turns; see the module docstring.

    Args:
      tools: the tools the model may call (by their `name`).
      fmt: the call/response format.
      max_turns: model turns per trajectory (T); the T-th turn ends it, tool call or not.
      reward: a host reward name (`rewards/host.py:HOST_REWARDS`) scored on the final turn's text.
      describe_tools: reset's observation starts with `tool_instructions` (False: the prompt alone, for chat
        templates that list the tools themselves).
      call_reward: added to the trajectory's reward for its first well-formed call (parsed, a known tool,
        ran without error): the issue's "small reward for well-formed calls"; once per trajectory, so
        calling more often than needed earns nothing more.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        fmt: ToolFormat = ToolFormat(),
        max_turns: int = 4,
        reward: str = "math_accuracy",
        describe_tools: bool = True,
        call_reward: float = 0.0,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        names = [t.name for t in tools]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"tools must be a non-empty list of distinct tools, got {names}")
        _host_reward(reward)
        self.tools = {t.name: t for t in tools}
        self.fmt = fmt
        self.max_turns = int(max_turns)
        self.reward = reward
        self.describe_tools = describe_tools
        self.call_reward = float(call_reward)
        self.example: dict[str, Any] = {}
        self.turn = 0
        self.rewarded_call = False

    def reset(self, example: Mapping[str, Any]) -> str:
        self.example = dict(example)
        self.turn = 0
        self.rewarded_call = False
        prompt = str(self.example.get("prompt", ""))
        if not self.describe_tools:
            return prompt
        return f"{tool_instructions(list(self.tools.values()), self.fmt)}\n\n{prompt}"

    def step(self, text: str) -> StepResult:
        self.turn += 1
        info: dict[str, Any] = {"turn": self.turn, "tool": None, "tool_error": None}
        call = parse_tool_call(text, self.fmt)
        if call is None or self.turn >= self.max_turns:
            info["turn_limit"] = call is not None
            return "", float(_host_reward(self.reward)(text, self.example)), True, info
        outcome = run_tool_call(call, self.tools)
        info.update(tool=outcome.tool, tool_error=outcome.error)
        reward = 0.0
        if outcome.error is None and self.call_reward and not self.rewarded_call:
            reward, self.rewarded_call = self.call_reward, True
            info["call_reward"] = reward  # a caller that never shows the answer takes it back
        return format_observation(outcome.message, self.fmt), reward, False, info


# ---------------------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------------------

EnvFactory = Callable[..., Environment]
ENVIRONMENTS: dict[str, EnvFactory] = {}

TOOL_FORMATS: dict[str, Callable[..., ToolFormat]] = {"plain": ToolFormat, "qwen2_5": ToolFormat.qwen2_5}


def register_env(name: str) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator: register `factory(**options) -> Environment` under `name`."""

    def decorate(factory: EnvFactory) -> EnvFactory:
        existing = ENVIRONMENTS.get(name)
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            raise ValueError(f"environment {name!r} is already registered by {existing.__module__}")
        ENVIRONMENTS[name] = factory
        return factory

    return decorate


def make_env(name: str, **options) -> Environment:
    """Build one registered environment. Unknown name or option -> ValueError listing the known ones."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(ENVIRONMENTS)}")
    factory = ENVIRONMENTS[name]
    accepted = {p.name for p in inspect.signature(factory).parameters.values()}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"environment {name!r}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    return factory(**options)


def _tool_env(
    tool_names: Sequence[str],
    *,
    max_turns: int,
    reward: str,
    fmt: ToolFormat | str,
    tools: Mapping[str, Mapping[str, Any]] | None,
    describe_tools: bool,
    call_reward: float,
) -> ToolEnv:
    if isinstance(fmt, str):
        if fmt not in TOOL_FORMATS:
            raise ValueError(f"unknown tool format {fmt!r}; known: {sorted(TOOL_FORMATS)}")
        fmt = TOOL_FORMATS[fmt]()
    options = dict(tools or {})
    unknown = sorted(set(options) - set(tool_names))
    if unknown:
        raise ValueError(
            f"tools: options for tool(s) {unknown} this environment does not have ({list(tool_names)})"
        )
    built = [make_tool(name, **dict(options.get(name, {}))) for name in tool_names]
    return ToolEnv(
        built,
        fmt=fmt,
        max_turns=max_turns,
        reward=reward,
        describe_tools=describe_tools,
        call_reward=call_reward,
    )


@register_env("calculator")
def make_calculator_env(
    max_turns: int = 4,
    reward: str = "math_accuracy",
    fmt: ToolFormat | str = "plain",
    tools: Mapping[str, Mapping[str, Any]] | None = None,
    describe_tools: bool = True,
    call_reward: float = 0.0,
) -> ToolEnv:
    """Arithmetic word problems with a calculator; scored by the math verifier on the final answer."""
    return _tool_env(
        ["calculator"],
        max_turns=max_turns,
        reward=reward,
        fmt=fmt,
        tools=tools,
        describe_tools=describe_tools,
        call_reward=call_reward,
    )


@register_env("python")
def make_python_env(
    max_turns: int = 4,
    reward: str = "math_accuracy",
    fmt: ToolFormat | str = "plain",
    tools: Mapping[str, Mapping[str, Any]] | None = None,
    describe_tools: bool = True,
    call_reward: float = 0.0,
) -> ToolEnv:
    """Math with a sandboxed Python interpreter; scored by the math verifier on the final answer."""
    return _tool_env(
        ["python"],
        max_turns=max_turns,
        reward=reward,
        fmt=fmt,
        tools=tools,
        describe_tools=describe_tools,
        call_reward=call_reward,
    )


@register_env("python_countdown")
def make_python_countdown_env(
    max_turns: int = 4,
    reward: str = "countdown",
    fmt: ToolFormat | str = "plain",
    tools: Mapping[str, Mapping[str, Any]] | None = None,
    describe_tools: bool = True,
    call_reward: float = 0.0,
) -> ToolEnv:
    """Countdown (TinyZero) with a sandboxed Python interpreter; scored by the Countdown reward."""
    return _tool_env(
        ["python"],
        max_turns=max_turns,
        reward=reward,
        fmt=fmt,
        tools=tools,
        describe_tools=describe_tools,
        call_reward=call_reward,
    )
