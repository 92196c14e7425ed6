"""The tool-call text format: how a model asks for a tool and how the answer comes back (docs/ARCHITECTURE.md,
"Tool use").

The model ends a turn with `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>` (JSON inside the
tags; `arguments` may also be a JSON string of an object, as OpenAI-style models write it); the
environment appends `observation_prefix + <tool_response>RESULT</tool_response> + observation_suffix` and
the model continues. This is Qwen2.5's (and Hermes') format; the tag strings and the turn separators are
fields of `ToolFormat`, `ToolFormat.qwen2_5()` gives that chat template's separators and
`ToolFormat.from_chat_template(tokenizer)` reads them off any HF chat template that renders a `tool`
message.

`parse_tool_call(text, fmt)` never raises: it returns a `ToolCall`, a `ToolCallError` (kind "malformed")
or None when the turn has no call (a final answer). `format_observation` truncates the result to
`max_observation_chars` (`truncate_observation`) so one tool cannot flood the context.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

# Error kinds counted in the tool stats (`tool/errors/<kind>`).
ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "tool_error", "timeout", "sandbox_unavailable")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolFormat:
    """Tag strings and turn separators of the tool-call format.

    call_open / call_close: around the model's JSON call.
    response_open / response_close: around the tool's result in the observation.
    observation_prefix / observation_suffix: what closes the model's turn before the response and opens
      its next turn after it (chat-template role markers; plain text: newlines). The completion text given
      to the parser and to `tool_observation` is the model's turn without its stop token.
    max_observation_chars: the tool result's length limit inside the tags (`truncate_observation`).
    """

    call_open: str = "<tool_call>"
    call_close: str = "</tool_call>"
    response_open: str = "<tool_response>"
    response_close: str = "</tool_response>"
    observation_prefix: str = "\n"
    observation_suffix: str = "\n"
    max_observation_chars: int = 2048

    def __post_init__(self):
        for name in ("call_open", "call_close", "response_open", "response_close"):
            if not getattr(self, name):
                raise ValueError(f"ToolFormat.{name} must be a non-empty string")
        if self.max_observation_chars < 1:
            raise ValueError(
                f"ToolFormat.max_observation_chars must be >= 1, got {self.max_observation_chars}"
            )

    @classmethod
    def qwen2_5(cls, **overrides) -> ToolFormat:
        """Qwen2.5-Instruct's chat template: the tool's answer is a `user` turn holding the response tags."""
        fields = dict(
            response_open="<tool_response>\n",
            response_close="\n</tool_response>",
            observation_prefix="<|im_end|>\n<|im_start|>user\n",
            observation_suffix="<|im_end|>\n<|im_start|>assistant\n",
        )
        return cls(**(fields | overrides))

    @classmethod
    def from_chat_template(cls, tokenizer: Any, **overrides) -> ToolFormat:
        """Separators read off `tokenizer.apply_chat_template` (an HFTokenizer or a transformers tokenizer):
        renders user, assistant, tool turns and takes the text between the assistant's content and the
        tool's, and after the tool's. The template must put the response tags around a tool message."""
        marker_a, marker_t = "\x00ASSISTANT\x00", "\x00TOOL\x00"
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": marker_a},
            {"role": "tool", "content": marker_t},
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not isinstance(text, str) or marker_a not in text or marker_t not in text:
            raise ValueError(
                "from_chat_template: the tokenizer's chat template does not render a 'tool' message"
            )
        between = text.split(marker_a, 1)[1].split(marker_t, 1)[0]
        after = text.split(marker_t, 1)[1]
        base = cls(**{k: v for k, v in overrides.items() if k in ("call_open", "call_close")})
        open_at, close_at = between.rfind(base.response_open.strip()), after.find(base.response_close.strip())
        if open_at < 0 or close_at < 0:
            raise ValueError(
                f"from_chat_template: the chat template does not wrap tool messages in "
                f"{base.response_open.strip()}…{base.response_close.strip()}"
            )
        fields = dict(
            observation_prefix=between[:open_at],
            response_open=between[open_at:],
            response_close=after[: close_at + len(base.response_close.strip())],
            observation_suffix=after[close_at + len(base.response_close.strip()) :],
        )
        return cls(**(fields | overrides))


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A call that could not be made: `kind` is one of ERROR_KINDS; `message` is shown to the model."""

    kind: str
    message: str


def parse_tool_call(text: str, fmt: ToolFormat = ToolFormat()) -> ToolCall | ToolCallError | None:
    """The first complete tool call of the turn `text`; None if the turn has none. Never raises."""
    start = text.find(fmt.call_open)
    if start < 0:
        return None
    body_start = start + len(fmt.call_open)
    end = text.find(fmt.call_close, body_start)
    if end < 0:
        return ToolCallError("malformed", f"{fmt.call_open} without {fmt.call_close}")
    body = text[body_start:end].strip()
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as error:
        return ToolCallError("malformed", f"the call is not valid JSON: {error}")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return ToolCallError("malformed", 'the call must be a JSON object with a string "name"')
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as error:
            return ToolCallError("malformed", f'"arguments" is a string but not JSON: {error}')
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCallError(
            "malformed", f'"arguments" must be a JSON object, got {type(arguments).__name__}'
        )
    return ToolCall(call["name"], arguments)


def truncate_observation(content: str, max_chars: int) -> str:
    """`content` if it fits in `max_chars`, else its head and a note of how much was cut, `max_chars` long
    at most (head truncation: a program's first lines and a traceback's start carry the most)."""
    if len(content) <= max_chars:
        return content
    note = f"\n[... {len(content)} characters, cut to {max_chars}]"
    if len(note) >= max_chars:
        return content[:max_chars]
    return content[: max_chars - len(note)] + note


def format_observation(content: str, fmt: ToolFormat = ToolFormat()) -> str:
    """The text appended after the model's turn: separators and response tags around the truncated result."""
    body = truncate_observation(content, fmt.max_observation_chars)
    return f"{fmt.observation_prefix}{fmt.response_open}{body}{fmt.response_close}{fmt.observation_suffix}"


def format_call(name: str, arguments: Mapping[str, Any], fmt: ToolFormat = ToolFormat()) -> str:
    """The text a model writes to call `name` (tests, SFT data, prompts' examples)."""
    return f"{fmt.call_open}{json.dumps({'name': name, 'arguments': dict(arguments)})}{fmt.call_close}"
