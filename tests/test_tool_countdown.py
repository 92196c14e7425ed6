"""Countdown with the sandboxed Python tool (docs/ARCHITECTURE.md, "Tool use"): the python tool's `prelude`,
`CountdownTask(demonstration="tool")` and its program (`data/countdown_program.py`), and
configs/tool_python_countdown.py, its `:runlocal` run end to end.

Where no sandbox isolation layer works on the machine (`sandbox.isolation().backend is None`), the tests
that run the tool pass `allow_unsandboxed=True` explicitly: the code still runs in a subprocess with the
sandbox's rlimits, never in the test's process. Where one works (bwrap or unshare), they use it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from grpo_jax.cli import sweep
from grpo_jax.config_utils import sibling_config
from grpo_jax.data import countdown_program
from grpo_jax.data.pipeline import completion_tokens
from grpo_jax.data.tasks import DEMONSTRATIONS, CountdownTask, task_special_symbols, tool_symbols
from grpo_jax.envs import (
    EnvConfig,
    ToolCall,
    ToolFormat,
    format_observation,
    make_tool,
    parse_tool_call,
    sandbox,
)
from grpo_jax.rewards.host import countdown_host_reward
from grpo_jax.tokenizers import R1_SPECIAL_SYMBOLS
from grpo_jax.training import setup

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tool_python_countdown.py")
UNSANDBOXED = sandbox.isolation().backend is None  # then the runs below opt in, as the docstring says
# Starting a sandboxed interpreter takes 0.1 s on an idle machine and seconds on a loaded one: the tests
# check what the tool answers, not its limits (tests/test_sandbox.py does), so they give it a minute.
WALL_TIME_S = 60.0


def _config(arg=None):
    config = sibling_config(CONFIG, "tool_python_countdown.py", arg)
    config.grpo.allow_unsandboxed = UNSANDBOXED
    return config


def _config_sweep():
    spec = importlib.util.spec_from_file_location("configs_tool_python_countdown", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_sweep()


@pytest.fixture(scope="module")
def tool_examples():
    return CountdownTask(seed=0, demonstration="tool").split("train", 300)


# --------------------------------------------------------------------------------------------------
# The python tool's prelude
# --------------------------------------------------------------------------------------------------


def test_python_tool_runs_its_prelude_before_every_call():
    """`prelude` is defined for the call's code (and not shown in the output); without it the same call is
    a NameError; a prelude that is not a string fails in one line."""
    prelude = "def f(x):\n    print(x * 2)\n"
    options = dict(allow_unsandboxed=UNSANDBOXED, wall_time_s=WALL_TIME_S)
    tool = make_tool("python", prelude=prelude, **options)
    assert tool({"code": "f(21)"}) == "42"
    bare = make_tool("python", **options)({"code": "f(21)"})
    assert "NameError" in bare and "[exit status 1]" in bare
    with pytest.raises(ValueError, match="prelude must be a string"):
        make_tool("python", prelude=["def f(): pass"])


# --------------------------------------------------------------------------------------------------
# The task and its program
# --------------------------------------------------------------------------------------------------


def test_default_demonstration_is_unchanged_and_flavours_share_their_problems():
    """The default is the construction's steps, as before `demonstration` existed; every flavour draws the
    same problems (so a sweep's points are judged on the same held-out split)."""
    steps = CountdownTask(seed=0).split("train", 50)
    assert steps == CountdownTask(seed=0, demonstration="steps").split("train", 50)
    for e in steps:
        assert "completion_segments" not in e
        assert e["completion"].startswith("<think> ") and e["completion"].endswith(
            f"<answer> {e['answer']} </answer>"
        )
    for demonstration in DEMONSTRATIONS:
        other = CountdownTask(seed=0, demonstration=demonstration).split("test", 30)
        fields = lambda es: [(e["prompt"], e["numbers"], e["target"], e["answer"]) for e in es]  # noqa: E731
        assert fields(other) == fields(CountdownTask(seed=0).split("test", 30))
    bare = CountdownTask(seed=0, demonstration="answer").split("train", 5)
    assert [e["completion"] for e in bare] == [f"<answer> {e['answer']} </answer>" for e in bare]
    with pytest.raises(ValueError, match="demonstration must be one of"):
        CountdownTask(demonstration="python")
    assert task_special_symbols("countdown") == R1_SPECIAL_SYMBOLS
    assert task_special_symbols("countdown", {"demonstration": "tool"}) == (
        *R1_SPECIAL_SYMBOLS,
        *tool_symbols(ToolFormat()),
    )


def test_solve_finds_a_correct_expression_for_every_problem(tool_examples):
    """`solve` (the prelude) prints an expression the countdown reward scores 1 on every generated problem
    (a search over what CountdownTask's construction uses, so one always exists), and `none` when there
    is none; the program is self-contained source."""
    for e in tool_examples:
        found = countdown_program.expected_output(e["numbers"], e["target"])
        assert found.endswith("\n") and found.count("\n") == 1
        assert countdown_host_reward(f"<answer> {found.strip()} </answer>", e) == 1.0, (e["numbers"], found)
    assert countdown_program.expected_output([2, 3], 100) == "none\n"
    tree = ast.parse(countdown_program.PRELUDE)
    assert [type(node) for node in tree.body] == [ast.FunctionDef] and tree.body[0].name == "solve"
    assert not any(isinstance(node, (ast.Import, ast.ImportFrom, ast.Global)) for node in ast.walk(tree))


def test_tool_demonstration_is_the_call_the_observation_and_the_answer(tool_examples):
    """The call is the python tool on `solve(<the prompt's list>, <target>)`; the observation is the
    formatted output of that program, untrainable; the answer is the expression found, scored 1."""
    for e in tool_examples[:100]:
        (call, c_flag), (observation, o_flag), (answer, a_flag) = e["completion_segments"]
        assert (c_flag, o_flag, a_flag) == (True, False, True)
        assert call + observation + answer == e["completion"]
        code = f"solve({e['numbers']}, {e['target']})"
        assert f"numbers {e['numbers']}, " in e["prompt"] and f"equals {e['target']}. " in e["prompt"]
        assert parse_tool_call(call) == ToolCall("python", {"code": code})
        assert re.fullmatch(r"solve\(\[\d+(, \d+)*\], \d+\)", code)
        found = countdown_program.expected_output(e["numbers"], e["target"]).strip()
        assert observation == format_observation(found) and answer == f"<answer> {found} </answer>"
        assert countdown_host_reward(e["completion"], e) == 1.0


def test_demonstration_observations_are_what_the_configs_environment_returns(tool_examples):
    """The observation segment equals the `python_countdown` environment's answer to the call, built from
    the config (the real python tool: the prelude, the sandbox, the formatting); the answer then ends the
    trajectory with reward 1."""
    config = _config()
    config.grpo.env_options.tools.python.wall_time_s = WALL_TIME_S
    env_config = EnvConfig.from_config(config.grpo, name="config.grpo")
    env = env_config.env_factory()()
    for e in tool_examples[:4]:
        (call, _), (observation, _), (answer, _) = e["completion_segments"]
        assert env.reset(e) == e["prompt"]
        response, reward, done, info = env.step(call)
        assert (response, reward, done, info["tool"], info["tool_error"]) == (
            observation,
            0.0,
            False,
            "python",
            None,
        )
        _, reward, done, _ = env.step(answer)
        assert done and reward == 1.0


# --------------------------------------------------------------------------------------------------
# configs/tool_python_countdown.py
# --------------------------------------------------------------------------------------------------


def test_config_is_sandboxed_and_both_sweep_points_fit_their_budgets(tmp_path):
    """The config keeps the sandbox (`allow_unsandboxed` False); each sweep point's prompts and
    demonstrations fit the sequence budgets with the run's tokenizer (for `tool`: the tags single tokens,
    the demonstrations round-trip, each observation within `max_observation_tokens`)."""
    config = sibling_config(CONFIG, "tool_python_countdown.py")
    assert config.grpo.allow_unsandboxed is False and config.grpo.env == "python_countdown"
    assert config.grpo.env_options.tools.python.prelude == countdown_program.PRELUDE
    config.task.update(train_size=400, test_size=50)
    points = {p["_name"]: p for p in _config_sweep()}
    assert set(points) == {"tool", "no_tool"}
    for name, point in points.items():
        run = sweep.apply_point(config, point)
        task = setup.build_task(run)
        tokenizer = setup.build_tokenizer(run, task, str(tmp_path / name))
        assert run.model.to_dict() == config.model.to_dict() and run.sft.steps == config.sft.steps
        for example in task.train + task.test:
            prompt_len = len(tokenizer.encode(f"Question: {example['prompt']}\nAnswer:", add_bos=True))
            ids, _ = completion_tokens(example, tokenizer)
            assert prompt_len <= run.max_prompt_len and len(ids) <= run.max_new_tokens
            assert prompt_len + len(ids) <= run.sft.max_len
            assert len(tokenizer.encode(example["answer"])) <= run.max_answer_len
        if name == "no_tool":
            assert EnvConfig.from_config(run.grpo) is None and "completion_segments" not in task.train[0]
            assert tuple(map(tuple, run.grpo.host_rewards)) == (("countdown", 1.0),)
            continue
        for tag in tool_symbols(ToolFormat()):
            assert tokenizer.encode(tag)[-1] == tokenizer.token_to_id(tag)
        for example in task.train:
            assert tokenizer.decode(tokenizer.encode(example["completion"])) == example["completion"]
            (_, _), (observation, _), _ = example["completion_segments"]
            assert len(tokenizer.encode(observation)) <= run.grpo.max_observation_tokens
        setup.check_tool_demonstrations(run, run.stages, task, tokenizer)  # format and tool name agree


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    from shared_runs import compilation_cache

    return compilation_cache(tmp_path_factory)


@pytest.mark.slow
def test_runlocal_trains_end_to_end_and_its_tool_calls_run(tmp_path, xla_cache):
    """`scripts/train.py --config=configs/tool_python_countdown.py:runlocal` (cold start, then two GRPO steps
    on multi-turn rollouts in `python_countdown`): every stage's losses are finite, the GRPO steps' rows
    call the python tool and some calls run in the sandbox without a tool error (a malformed call, an
    unavailable sandbox or a time-out would be one), their observations are fed back into the rows, and
    the held-out evaluation runs after each stage. (The tool's wall-clock limit is raised for a loaded
    test machine, as above.)"""
    from test_train_script import assert_ok, metric_lines, train

    overrides = [
        f"--config.grpo.env_options.tools.python.wall_time_s={WALL_TIME_S}",
        f"--config.grpo.env_timeout_s={2 * WALL_TIME_S}",
    ]
    overrides += ["--config.grpo.allow_unsandboxed=True"] if UNSANDBOXED else []
    assert_ok(train(tmp_path, *overrides, cache=xla_cache, config=f"--config={CONFIG}:runlocal"))
    lines = metric_lines(tmp_path)
    sft = [x for x in lines if x["stage"] == "sft"]
    grpo = [x for x in lines if x["stage"] == "grpo"]
    config = _config("runlocal")
    sft_steps, grpo_steps = config.sft.steps, config.grpo.steps
    assert len(sft) == sft_steps and len(grpo) == grpo_steps
    assert all(math.isfinite(x["loss"]) for x in sft + grpo) and sft[-1]["loss"] < sft[0]["loss"]
    calls = sum(x["tool/num_calls"] for x in grpo)
    ran = calls - sum(x["tool/num_errors"] for x in grpo)
    assert calls > 0 and ran > 0, [
        {k: v for k, v in x.items() if k.startswith(("tool", "env"))} for x in grpo
    ]
    assert sum(x["tool/errors/sandbox_unavailable"] + x["tool/errors/timeout"] for x in grpo) == 0
    assert max(x["turns/observation_tokens_mean"] for x in grpo) > 0
    assert [x["step"] for x in lines if x["stage"] == "eval"] == [sft_steps, sft_steps + grpo_steps]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["grpo"]["allow_unsandboxed"] is UNSANDBOXED and saved["grpo"]["env"] == "python_countdown"
