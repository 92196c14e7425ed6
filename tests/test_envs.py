"""grpo_jax.envs: the tool-call format, the calculator, tool-use environments, the batch runner and the
config keys (docs/ARCHITECTURE.md, "Tool use"; docs/CONTRACTS.md)."""

import functools
import os
import time

import numpy as np
import pytest

from grpo_jax.envs import (
    ENVIRONMENTS,
    ERROR_KINDS,
    TOOLS,
    Calculator,
    EnvConfig,
    Environment,
    EnvRunner,
    ToolCall,
    ToolCallError,
    ToolEnv,
    ToolFormat,
    format_call,
    format_observation,
    make_env,
    make_tool,
    parse_tool_call,
    tool_observation,
    truncate_observation,
)
from grpo_jax.envs.tools import ToolError

CALL_42 = format_call("calculator", {"expression": "6 * 7"})


# ---------------------------------------------------------------------------------------------------------
# The format.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>', ToolCall("calc", {"x": 1})),
        ('think...\n<tool_call>\n{"name": "calc", "arguments": {}}\n</tool_call>', ToolCall("calc", {})),
        ('<tool_call>{"name": "calc", "arguments": "{\\"x\\": 2}"}</tool_call>', ToolCall("calc", {"x": 2})),
        ('<tool_call>{"name": "calc"}</tool_call>', ToolCall("calc", {})),
        (  # the first complete call wins
            '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"}</tool_call>',
            ToolCall("a", {}),
        ),
        ("the answer is 4", None),
        ("<tool_call>{not json}</tool_call>", "malformed"),
        ('<tool_call>{"name": "calc", "arguments": {"x": 1}}', "malformed"),  # cut off: no closing tag
        ('<tool_call>["calc"]</tool_call>', "malformed"),
        ('<tool_call>{"arguments": {}}</tool_call>', "malformed"),
        ('<tool_call>{"name": "calc", "arguments": [1]}</tool_call>', "malformed"),
        ('<tool_call>{"name": "calc", "arguments": "nope"}</tool_call>', "malformed"),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", "malformed"),
    ],
)
def test_parse_tool_call(text, expected):
    parsed = parse_tool_call(text)
    if isinstance(expected, str):
        assert isinstance(parsed, ToolCallError) and parsed.kind == expected
    else:
        assert parsed == expected


def test_tags_are_configurable():
    fmt = ToolFormat(call_open="[CALL]", call_close="[/CALL]", response_open="[OUT]", response_close="[/OUT]")
    assert parse_tool_call('[CALL]{"name": "calculator"}[/CALL]', fmt) == ToolCall("calculator", {})
    assert parse_tool_call(CALL_42, fmt) is None
    observation, outcome = tool_observation(
        '[CALL]{"name": "calculator", "arguments": {"expression": "1+1"}}[/CALL]',
        {"calculator": Calculator()},
        fmt,
    )
    assert observation == "\n[OUT]2[/OUT]\n" and outcome.error is None
    with pytest.raises(ValueError, match="ToolFormat.call_open"):
        ToolFormat(call_open="")


def test_truncation_rule():
    assert truncate_observation("short", 10) == "short"
    cut = truncate_observation("x" * 5000, 100)
    assert len(cut) == 100 and cut.startswith("x" * 50) and cut.endswith("[... 5000 characters, cut to 100]")
    assert truncate_observation("abcdef", 3) == "abc"  # too small for the note: the head alone
    fmt = ToolFormat(max_observation_chars=64)
    observation = format_observation("y" * 1000, fmt)
    assert observation.startswith("\n<tool_response>y") and observation.endswith("</tool_response>\n")
    assert len(observation) == 64 + len("\n<tool_response></tool_response>\n")


def test_qwen2_5_format_matches_its_chat_template():
    jinja2 = pytest.importorskip("jinja2")
    # Qwen2.5-Instruct's template, its assistant and tool branches (verbatim in substance).
    template = jinja2.Environment().from_string(
        "{%- for message in messages %}"
        "{%- if message.role == 'tool' %}"
        "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
        "{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    assert ToolFormat.from_chat_template(Tokenizer()) == ToolFormat.qwen2_5()
    observation, _ = tool_observation(CALL_42, {"calculator": Calculator()}, ToolFormat.qwen2_5())
    assert (
        observation == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )

    class NoTools:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(m["content"] for m in messages if m["role"] != "tool")

    with pytest.raises(ValueError, match="does not render a 'tool' message"):
        ToolFormat.from_chat_template(NoTools())


# ---------------------------------------------------------------------------------------------------------
# The calculator.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 * (3 + 4) ** 2", "98"),
        ("-3 + +2", "-1"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** -2", "0.25"),
        ("1.5e3 * 2", "3000"),
        ("10 ** 30", str(10**30)),
        ("(((1)))", "1"),
    ],
)
def test_calculator_values(expression, expected):
    assert Calculator()({"expression": expression}) == expected


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('echo hi')", "unsupported syntax: Call"),
        ("x + 1", "unsupported syntax: Name"),
        ("(1).real", "unsupported syntax: Attribute"),
        ("[1, 2]", "unsupported syntax: List"),
        ("'a' * 3", "unsupported literal"),
        ("True + 1", "unsupported literal"),
        ("1j * 2", "unsupported literal"),
        ("1 if 1 else 2", "unsupported syntax: IfExp"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("1 / 0", "division by zero"),
        ("9 ** 9 ** 9", "exponent 387420489 beyond"),
        ("(10 ** 999) * (10 ** 999)", "longer than 1000 digits"),
        ("99 ** 999", "longer than 1000 digits"),
        ("1e308 * 10", "out of range"),
        ("(-8) ** 0.5", "fractional power"),
        ("1 +", "not an arithmetic expression"),
        ("1" + " + 1" * 100, "longer than 200 characters"),
    ],
)
def test_calculator_refuses_and_never_evals(expression, message):
    start = time.monotonic()
    with pytest.raises(ToolError, match=message):
        Calculator()({"expression": expression})
    assert time.monotonic() - start < 0.5


def test_calculator_source_has_no_eval():
    import inspect

    from grpo_jax.envs import tools

    source = inspect.getsource(tools)
    assert "eval(" not in source.replace("_eval(", "").replace("evaluate(", "")


def test_tool_registry():
    assert {"calculator", "python"} <= set(TOOLS)
    assert make_tool("calculator", max_exponent=3)({"expression": "2 ** 3"}) == "8"
    with pytest.raises(ToolError, match="beyond"):
        make_tool("calculator", max_exponent=3)({"expression": "2 ** 4"})
    with pytest.raises(ValueError, match=r"unknown tool 'abacus'; known: \["):
        make_tool("abacus")
    with pytest.raises(ValueError, match=r"tool 'calculator': unknown option\(s\) \['digits'\]"):
        make_tool("calculator", digits=3)


# ---------------------------------------------------------------------------------------------------------
# tool_observation: the per-row step, every failure an observation.
# ---------------------------------------------------------------------------------------------------------


class _Broken:
    name, description, parameters = "broken", "raises", {}

    def __call__(self, arguments):
        raise RuntimeError("boom")


class _NotText:
    name, description, parameters = "not_text", "returns a number", {}

    def __call__(self, arguments):
        return 3


@pytest.mark.parametrize(
    "text, kind",
    [
        ("<tool_call>{oops}</tool_call>", "malformed"),
        (format_call("abacus", {}), "unknown_tool"),
        (format_call("calculator", {"expr": "1"}), "bad_arguments"),
        (format_call("calculator", {"expression": "1/0"}), "tool_error"),
        (format_call("broken", {}), "tool_error"),
        (format_call("not_text", {}), "tool_error"),
    ],
)
def test_failures_become_error_observations(text, kind):
    tools = {"calculator": Calculator(), "broken": _Broken(), "not_text": _NotText()}
    observation, outcome = tool_observation(text, tools)
    assert outcome.error == kind and kind in ERROR_KINDS
    assert observation.startswith(f"\n<tool_response>error ({kind}): ")
    assert tool_observation("no call here", tools) == (None, None)


# ---------------------------------------------------------------------------------------------------------
# Environments and the runner.
# ---------------------------------------------------------------------------------------------------------


def test_tool_env_turns_rewards_and_turn_limit():
    env = make_env("calculator", max_turns=3)
    first = env.reset({"prompt": "What is 6 times 7?", "answer": "42"})
    assert first.endswith("What is 6 times 7?") and '"name": "calculator"' in first and "<tool_call>" in first
    assert env.step(CALL_42) == (
        "\n<tool_response>42</tool_response>\n",
        0.0,
        False,
        {"turn": 1, "tool": "calculator", "tool_error": None},
    )
    observation, reward, done, info = env.step("<tool_call>{oops}</tool_call>")
    assert "error (malformed)" in observation and (reward, done, info["tool_error"]) == (
        0.0,
        False,
        "malformed",
    )
    observation, reward, done, info = env.step(CALL_42)  # third turn: the limit ends it, call unanswered
    assert (observation, reward, done, info["turn_limit"]) == ("", 0.0, True, True)

    env.reset({"prompt": "What is 6 times 7?", "answer": "42"})
    assert env.step(r"It is \boxed{42}.")[1:3] == (1.0, True)
    countdown = make_env("python_countdown", describe_tools=False)
    assert countdown.reset({"prompt": "p", "numbers": [1, 2], "target": 3}) == "p"
    assert countdown.step("<answer>1 + 2</answer>")[1:3] == (1.0, True)


def test_call_reward_pays_the_first_well_formed_call_only():
    """`call_reward` (the issue's "small reward for well-formed calls"): a malformed call and a call that
    errors earn nothing, the first good call earns it, a second good call nothing more; off by default."""
    example = {"prompt": "What is 6 times 7?", "answer": "42"}
    env = make_env("calculator", max_turns=6, call_reward=0.25)
    env.reset(example)
    rewards = [env.step(text)[1] for text in ("<tool_call>{oops}</tool_call>", CALL_42, CALL_42)]
    assert rewards == [0.0, 0.25, 0.0]
    assert env.step(r"It is \boxed{42}.")[1:3] == (1.0, True)
    env.reset(example)  # a new trajectory pays again
    assert env.step(CALL_42)[1] == 0.25
    plain = make_env("calculator", max_turns=6)
    plain.reset(example)
    assert plain.step(CALL_42)[1] == 0.0


def test_env_registry_and_errors():
    assert {"calculator", "python", "python_countdown"} <= set(ENVIRONMENTS)
    with pytest.raises(ValueError, match=r"unknown environment 'chess'; known: \["):
        make_env("chess")
    with pytest.raises(ValueError, match=r"environment 'calculator': unknown option\(s\) \['turns'\]"):
        make_env("calculator", turns=3)
    with pytest.raises(ValueError, match="env reward 'nope' is not a host reward"):
        make_env("calculator", reward="nope")
    with pytest.raises(ValueError, match=r"options for tool\(s\) \['python'\]"):
        make_env("calculator", tools={"python": {}})
    with pytest.raises(ValueError, match="unknown tool format 'xml'"):
        make_env("calculator", fmt="xml")
    assert (
        make_env("calculator", tools={"calculator": {"max_exponent": 2}}).tools["calculator"].max_exponent
        == 2
    )


class FlakyEnv(Environment):
    """Misbehaves on the turn text: "hang" sleeps past the limit, "die" kills its process, "raise" raises."""

    def reset(self, example):
        self.turns = 0
        return f"start {example['id']}"

    def step(self, text):
        self.turns += 1
        if text == "hang":
            time.sleep(60)
        if text == "die":
            os._exit(3)
        if text == "raise":
            raise ValueError("bad turn")
        return f"turn {self.turns}", float(self.turns), self.turns >= 2, {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_runner_contains_hangs_crashes_and_errors(num_workers):
    runner = EnvRunner(FlakyEnv, timeout_s=1.0, num_workers=num_workers, kill_grace_s=0.5)
    try:
        assert runner.reset([{"id": i} for i in range(4)]) == [f"start {i}" for i in range(4)]
        texts = ["ok", "raise", "hang", "die" if num_workers else "ok"]
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="EnvRunner: "):
            out = runner.step(texts)
        assert time.monotonic() - start < 15.0
        assert (
            out.observations[0] == "turn 1"
            and "error (environment): ValueError: bad turn" in out.observations[1]
        )
        assert "error (environment)" in out.observations[2]
        np.testing.assert_array_equal(out.dones, [False, True, True, num_workers > 0])
        assert out.stats["env/num_timeouts"] == 1
        assert out.stats["env/num_errors"] == (2 if num_workers else 1)
        # The caller goes on: live rows step again (state kept), done rows are skipped (None).
        out = runner.step(["ok"] * 4)
        assert out.observations[:3] == ["turn 2", None, None]
        np.testing.assert_array_equal(out.rewards[:3], [2.0, 0.0, 0.0])
        assert out.dones[0] and out.stats["env/num_errors"] == out.stats["env/num_timeouts"] == 0
    finally:
        runner.close()


def test_runner_counts_tool_calls_and_errors_by_kind():
    runner = EnvRunner(functools.partial(make_env, "calculator", max_turns=2), num_workers=0)
    runner.reset([{"prompt": "q", "answer": "42"}] * 5)
    texts = [
        CALL_42,
        "<tool_call>{oops}</tool_call>",
        format_call("abacus", {}),
        format_call("calculator", {"expression": "1/0"}),
        r"\boxed{42}",
    ]
    out = runner.step(texts)
    stats = out.stats
    assert (stats["tool/num_calls"], stats["tool/num_errors"]) == (4, 3)
    assert (
        stats["tool/errors/malformed"],
        stats["tool/errors/unknown_tool"],
        stats["tool/errors/tool_error"],
    ) == (1, 1, 1)
    np.testing.assert_array_equal(out.rewards, [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(out.dones, [False] * 4 + [True])
    out = runner.step([r"\boxed{42}", CALL_42, "no", r"\boxed{42}", "ignored"])
    np.testing.assert_array_equal(out.rewards, [1, 0, 0, 1, 0])
    assert out.dones.all() and out.stats["tool/num_turn_limits"] == 1 and out.observations[4] is None


# ---------------------------------------------------------------------------------------------------------
# Config keys.
# ---------------------------------------------------------------------------------------------------------


def test_env_config_keys():
    ml_collections = pytest.importorskip("ml_collections")
    section = ml_collections.ConfigDict(
        {
            "env": "calculator",
            "env_options": {"reward": "math_accuracy", "tools": {"calculator": {"max_exponent": 5}}},
            "tool_format": "qwen2_5",
            "max_observation_chars": 8,
            "max_tool_turns": 2,
            "env_workers": 0,
        }
    )
    config = EnvConfig.from_config(section)
    assert EnvConfig.from_config({"env": ""}) is None and EnvConfig.from_config({}) is None
    env = config.env_factory()()
    assert isinstance(env, ToolEnv) and env.max_turns == 2 and env.tools["calculator"].max_exponent == 5
    assert env.fmt == ToolFormat.qwen2_5(max_observation_chars=8)
    with config.make_runner() as runner:
        runner.reset([{"prompt": "q", "answer": "1"}])
        out = runner.step([format_call("calculator", {"expression": "99999 * 99999"})])
    assert (
        "<tool_response>\n" + truncate_observation(str(99999 * 99999), 8) + "\n</tool_response>"
        in out.observations[0]
    )
    for key, value, message in [
        ("env", "chess", r"config.grpo.env: unknown environment 'chess'"),
        ("tool_format", "xml", r"config.grpo.tool_format: unknown 'xml'"),
        ("max_tool_turns", 0, r"config.grpo.max_tool_turns must be >= 1"),
        ("max_observation_chars", 0, r"config.grpo.max_observation_chars must be >= 1"),
        ("env_timeout_s", 0.0, r"config.grpo.env_timeout_s must be > 0"),
        ("env_options", {"max_turns": 3}, r"config.grpo.env_options: set max_turns"),
    ]:
        with pytest.raises(ValueError, match=message):
            EnvConfig.from_config({"env": "calculator", key: value})
    with pytest.raises(
        ValueError, match=r"config.grpo.env_options: environment 'calculator': unknown option"
    ):
        EnvConfig(env="calculator", env_options={"bogus": 1}).env_factory()
    with pytest.raises(ValueError, match="tool_format='chat_template' needs an HF tokenizer"):
        EnvConfig(env="calculator", tool_format="chat_template").env_factory()
