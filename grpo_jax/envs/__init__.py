"""Multi-turn tool use, host side: environments, tools, the tool-call format and the sandbox
(docs/ARCHITECTURE.md, "Tool use"; config keys in docs/CONTRACTS.md).

  make_env(name, **options) -> Environment       reset(example) -> str; step(text) -> (obs, r, done, info)
  EnvRunner(factory).reset(examples) / .step(texts)   N trajectories in worker processes with time limits
  tool_observation(text, tools, fmt)             the per-row step for the rollout side: the text to append
  parse_tool_call / format_observation / ToolFormat   the <tool_call>/<tool_response> format
  make_tool(name, **options)                     "calculator" (a safe parser), "python" (the sandbox)
  sandbox.run_python(code, limits=...)           isolated subprocess; fails closed without isolation
  EnvConfig.from_config(config.grpo)             a stage's keys: env, env_options, tool_format, ...
"""

from grpo_jax.envs import sandbox
from grpo_jax.envs.base import (
    ENVIRONMENTS,
    TOOL_FORMATS,
    Environment,
    ToolEnv,
    ToolOutcome,
    make_env,
    register_env,
    run_tool_call,
    tool_instructions,
    tool_observation,
)
from grpo_jax.envs.config import ENV_KEYS, EnvConfig
from grpo_jax.envs.runner import EnvRunner, StepOutput
from grpo_jax.envs.sandbox import SandboxLimits, SandboxResult, SandboxUnavailable, run_python
from grpo_jax.envs.tool_format import (
    ERROR_KINDS,
    ToolCall,
    ToolCallError,
    ToolFormat,
    format_call,
    format_observation,
    parse_tool_call,
    truncate_observation,
)
from grpo_jax.envs.tools import TOOLS, Calculator, PythonTool, ToolError, make_tool, register_tool

__all__ = [
    "ENVIRONMENTS",
    "ENV_KEYS",
    "ERROR_KINDS",
    "TOOLS",
    "TOOL_FORMATS",
    "Calculator",
    "EnvConfig",
    "EnvRunner",
    "Environment",
    "PythonTool",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "StepOutput",
    "ToolCall",
    "ToolCallError",
    "ToolEnv",
    "ToolError",
    "ToolFormat",
    "ToolOutcome",
    "format_call",
    "format_observation",
    "make_env",
    "make_tool",
    "parse_tool_call",
    "register_env",
    "register_tool",
    "run_python",
    "run_tool_call",
    "sandbox",
    "tool_instructions",
    "tool_observation",
    "truncate_observation",
]
