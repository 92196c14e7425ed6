"""A stage's tool-use settings, read once from its config section (docs/CONTRACTS.md, "Tool use").

Keys of an RL stage's section (e.g. `config.grpo`), all optional; `env = ""` (the default) is off:
  env                    registered environment name (`envs.ENVIRONMENTS`): "calculator", "python",
                         "python_countdown"
  env_options            dict of the environment factory's options (`reward`, `call_reward`, `tools`:
                         {tool name: {option: value}}, `describe_tools`)
  tool_format            "plain", "qwen2_5" or "chat_template" (read off the run's HF tokenizer)
  max_observation_chars  length limit of one tool result inside the response tags
  max_observation_tokens the most tokens of one observation the rollout feeds into a row (longer: cut)
  max_tool_turns         model turns per trajectory (T)
  env_timeout_s          time limit of one environment step of one trajectory (above the tools' own)
  env_workers            worker processes (-1: min(8, cpu count); 0: in-process)
  allow_unsandboxed      let the python tool run model code where no sandbox works (default: refuse)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from grpo_jax.envs.base import ENVIRONMENTS, TOOL_FORMATS, Environment, make_env
from grpo_jax.envs.runner import EnvRunner
from grpo_jax.envs.tool_format import ToolFormat

ENV_KEYS = (
    "env",
    "env_options",
    "tool_format",
    "max_observation_chars",
    "max_observation_tokens",
    "max_tool_turns",
    "env_timeout_s",
    "env_workers",
    "allow_unsandboxed",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """Validated tool-use settings of one stage (`section` names the config path in errors)."""

    env: str
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    tool_format: str = "plain"
    max_observation_chars: int = 2048
    max_observation_tokens: int = 64
    max_tool_turns: int = 4
    env_timeout_s: float = 30.0
    env_workers: int = -1
    allow_unsandboxed: bool = False
    section: str = "config.grpo"

    def __post_init__(self):
        where = self.section
        if self.env not in ENVIRONMENTS:
            raise ValueError(f"{where}.env: unknown environment {self.env!r}; known: {sorted(ENVIRONMENTS)}")
        if self.tool_format not in (*TOOL_FORMATS, "chat_template"):
            raise ValueError(
                f"{where}.tool_format: unknown {self.tool_format!r}; "
                f"known: {sorted(TOOL_FORMATS) + ['chat_template']}"
            )
        if self.max_observation_chars < 1:
            raise ValueError(f"{where}.max_observation_chars must be >= 1, got {self.max_observation_chars}")
        if self.max_observation_tokens < 1:
            raise ValueError(
                f"{where}.max_observation_tokens must be >= 1, got {self.max_observation_tokens}"
            )
        if self.max_tool_turns < 1:
            raise ValueError(f"{where}.max_tool_turns must be >= 1, got {self.max_tool_turns}")
        if not self.env_timeout_s > 0:
            raise ValueError(f"{where}.env_timeout_s must be > 0, got {self.env_timeout_s}")
        if self.env_workers < -1:
            raise ValueError(f"{where}.env_workers must be >= -1, got {self.env_workers}")
        if "max_turns" in self.env_options or "fmt" in self.env_options:
            raise ValueError(f"{where}.env_options: set max_turns / fmt with max_tool_turns / tool_format")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, name: str = "config.grpo") -> EnvConfig | None:
        """The settings of a stage section (ConfigDict or dict); None when `env` is absent or ""."""
        if not section.get("env", ""):
            return None
        values = {k: section[k] for k in ENV_KEYS if k in section}
        values["env_options"] = _plain(values.get("env_options", {}))
        return cls(**values, section=name)

    def tool_format_for(self, tokenizer: Any = None) -> ToolFormat:
        """The ToolFormat; "chat_template" needs the run's tokenizer (an HFTokenizer with a template)."""
        if self.tool_format == "chat_template":
            if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
                raise ValueError(
                    f"{self.section}.tool_format='chat_template' needs an HF tokenizer with a chat template"
                )
            return ToolFormat.from_chat_template(tokenizer, max_observation_chars=self.max_observation_chars)
        return TOOL_FORMATS[self.tool_format](max_observation_chars=self.max_observation_chars)

    def _build(self, fmt: ToolFormat, options: dict) -> Environment:
        """One environment with `options`; a bad option -> ValueError naming `<section>.env_options`."""
        try:
            return make_env(self.env, max_turns=self.max_tool_turns, fmt=fmt, **options)
        except ValueError as error:
            raise ValueError(f"{self.section}.env_options: {error}") from error

    def tool_names(self, tokenizer: Any = None) -> list[str]:
        """The names of the tools this stage's environment offers (built without its sandbox check)."""
        return sorted(getattr(self._build(self.tool_format_for(tokenizer), self.env_options), "tools", {}))

    def env_factory(self, tokenizer: Any = None) -> functools.partial:
        """A picklable `() -> Environment`; building one here checks every option (and, for the python tool,
        that a sandbox works or `allow_unsandboxed` is set: fails closed in one line)."""
        options = dict(self.env_options)
        fmt = self.tool_format_for(tokenizer)
        env = self._build(fmt, options)
        if self.allow_unsandboxed and "python" in getattr(env, "tools", {}):
            tools = {k: dict(v) for k, v in dict(options.get("tools") or {}).items()}
            tools.setdefault("python", {})["allow_unsandboxed"] = True
            options["tools"] = tools
            env = self._build(fmt, options)
        factory = functools.partial(make_env, self.env, max_turns=self.max_tool_turns, fmt=fmt, **options)
        _check_sandbox(env)
        return factory

    def make_runner(self, tokenizer: Any = None) -> EnvRunner:
        """The batch runner of this stage's environment (the caller closes it)."""
        fmt = self.tool_format_for(tokenizer)
        workers = None if self.env_workers == -1 else self.env_workers
        return EnvRunner(
            self.env_factory(tokenizer), timeout_s=self.env_timeout_s, num_workers=workers, fmt=fmt
        )


def _check_sandbox(env: Environment) -> None:
    for tool in getattr(env, "tools", {}).values():
        check = getattr(tool, "check_available", None)
        if check is not None:
            check()


def _plain(value: Any) -> Any:
    """ConfigDicts and FrozenConfigDicts as dicts, tuples of pairs left alone (picklable, comparable)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
