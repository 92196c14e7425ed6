"""The tool-use task side (docs/ARCHITECTURE.md, "Tool use"): MultiplicationTask's demonstrations, the
tokenizer's tool tags, the SFT loss mask on observations, and configs/tool_calculator.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_jax.cli import sweep
from grpo_jax.config_utils import sibling_config
from grpo_jax.data.pipeline import (
    completion_tokens,
    make_sft_dataset,
    sft_length_stats,
    tokenize_prompt,
    tokenize_sft_example,
)
from grpo_jax.data.tasks import (
    DEMONSTRATIONS,
    TASKS,
    MultiplicationTask,
    task_special_symbols,
    tool_symbols,
)
from grpo_jax.envs import EnvConfig, ToolCall, ToolFormat, make_env, parse_tool_call
from grpo_jax.rewards.host import math_accuracy_reward
from grpo_jax.rewards.math import extract_answer
from grpo_jax.tokenizers import R1_SPECIAL_SYMBOLS, load_tokenizer, train_sentencepiece
from grpo_jax.training import setup

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tool_calculator.py")
TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def _config(arg=None):
    return sibling_config(CONFIG, "tool_calculator.py", arg)


def _config_sweep():
    spec = importlib.util.spec_from_file_location("configs_tool_calculator", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_sweep()


@pytest.fixture(scope="module")
def tool_examples():
    return MultiplicationTask(seed=0).split("train", 300)


@pytest.fixture(scope="module")
def tool_tokenizer(tool_examples):
    task = MultiplicationTask(seed=0)
    texts = [f"Question: {e['prompt']}\nAnswer: {e['completion']}" for e in tool_examples]
    return train_sentencepiece(texts, vocab_size=64, user_defined_symbols=task.special_symbols)


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


def test_problems_digits_answers_and_disjoint_splits():
    assert TASKS["multiplication"] is MultiplicationTask
    train = MultiplicationTask(seed=0).split("train", 500)
    assert train == MultiplicationTask(seed=0).split("train", 500)
    for e in train:
        a, b = e["operands"]
        assert 3 <= len(str(a)) <= 4 and 2 <= len(str(b)) <= 3
        assert e["prompt"] == f"{a}*{b}" and e["answer"] == str(a * b)
    assert {len(str(e["operands"][0])) for e in train} == {3, 4}
    assert {len(str(e["operands"][1])) for e in train} == {2, 3}
    canonical = lambda e: tuple(sorted(e["operands"]))  # noqa: E731
    assert len({canonical(e) for e in train}) == 500
    test = {canonical(e) for seed in (0, 1, 2) for e in MultiplicationTask(seed=seed).split("test", 100)}
    for seed in (0, 1, 2):
        assert not {canonical(e) for e in MultiplicationTask(seed=seed).split("train", 500)} & test
    # The flavours share their problems: the sweep's points are judged on the same held-out split.
    for demonstration in DEMONSTRATIONS:
        other = MultiplicationTask(seed=0, demonstration=demonstration).split("test", 50)
        assert [e["operands"] for e in other] == [
            e["operands"] for e in MultiplicationTask(seed=0).split("test", 50)
        ]
    with pytest.raises(ValueError, match="demonstration must be one of"):
        MultiplicationTask(demonstration="python")
    with pytest.raises(ValueError, match="b_digits"):
        MultiplicationTask(b_digits=(3, 2))


def test_tool_demonstration_is_what_the_calculator_environment_answers(tool_examples):
    """The call parses to the calculator on the prompt's expression; the observation segment is exactly the
    environment's response to it; the answer segment ends the trajectory with reward 1."""
    for example in tool_examples[:50]:
        (call, c_flag), (observation, o_flag), (answer, a_flag) = example["completion_segments"]
        assert (c_flag, o_flag, a_flag) == (True, False, True)
        assert call + observation + answer == example["completion"]
        assert parse_tool_call(call) == ToolCall("calculator", {"expression": example["prompt"]})
        env = make_env("calculator", max_turns=2, describe_tools=False)
        assert env.reset(example) == example["prompt"]
        response, reward, done, info = env.step(call)
        assert response == observation and not done and info["tool_error"] is None
        _, reward, done, _ = env.step(answer)
        assert done and reward == 1.0
        assert math_accuracy_reward(example["completion"], example) == 1.0


def test_no_tool_demonstrations_answer_directly():
    steps, bare = (
        MultiplicationTask(seed=0, demonstration=d).split("train", 20) for d in ("steps", "answer")
    )
    for s, b in zip(steps, bare, strict=True):
        a, c = s["operands"]
        assert "completion_segments" not in s and "<tool_call>" not in s["completion"]
        assert s["completion"].startswith(f"<think> {a}*{c % 10}=") and extract_answer(
            s["completion"]
        ) == str(a * c)
        assert b["completion"] == f"<answer> {a * c} </answer>"


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


def test_task_special_symbols_add_the_tool_tags_only_for_tool_demonstrations():
    assert tool_symbols(ToolFormat()) == TAGS
    assert task_special_symbols("multiplication") == (*R1_SPECIAL_SYMBOLS, *TAGS)
    assert task_special_symbols("multiplication", {"demonstration": "steps"}) == R1_SPECIAL_SYMBOLS
    assert task_special_symbols("arithmetic", {"num_digits": 2}) == R1_SPECIAL_SYMBOLS
    assert task_special_symbols("gsm8k") == R1_SPECIAL_SYMBOLS
    with pytest.raises(ValueError, match="demonstration"):
        task_special_symbols("multiplication", {"demonstration": "nope"})


@pytest.mark.parametrize("demonstration", ["tool", "steps"])
def test_the_runs_tokenizer_holds_the_tool_tags_when_the_task_uses_tools(tmp_path, demonstration):
    """setup.build_tokenizer (the run's in-process tokenizer) makes every tag one token for the tool flavour
    (`</tool_call>` pauses a row of a multi-turn rollout) and round-trips the demonstrations, JSON included;
    the no-tool flavour's tokenizer splits them like any text."""
    config = _config("runlocal")
    config.task.kwargs.demonstration = demonstration
    task = setup.build_task(config)
    tokenizer = setup.build_tokenizer(config, task, str(tmp_path))
    for tag in TAGS:
        single = (
            tokenizer.encode(tag)[-1:] == [tokenizer.token_to_id(tag)] and len(tokenizer.encode(tag)) <= 2
        )
        assert single == (demonstration == "tool"), tag
    for example in task.train + task.test:
        text = f"Question: {example['prompt']}\nAnswer: {example['completion']}"
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.unk_id not in tokenizer.encode(example["completion"])


# --------------------------------------------------------------------------------------------------
# The SFT loss mask
# --------------------------------------------------------------------------------------------------


def test_observation_tokens_are_masked_in_sft(tool_examples, tool_tokenizer):
    """loss_mask is 0 on the prompt and on the observation's tokens (`tokenizer.encode(observation)`, as a
    multi-turn rollout feeds them), 1 on the call, the answer and EOS; without `completion_segments` the
    same text trains every completion token, so the segments are what masks the observation."""
    tok = tool_tokenizer
    for example in tool_examples[:20]:
        (call, _), (observation, _), (answer, _) = example["completion_segments"]
        row = tokenize_sft_example(example, tok, "plain", 120)
        prompt_len = int(tokenize_prompt(example, tok, "plain", 120)[1].sum())
        pieces = [tok.encode(call), tok.encode(observation), tok.encode(answer), [tok.eos_id]]
        length = prompt_len + sum(map(len, pieces))
        assert int(row["attention_mask"].sum()) == length and not row["truncated"]
        assert row["tokens"][prompt_len:length].tolist() == sum(pieces, [])
        expected = [0] * prompt_len + [1] * len(pieces[0]) + [0] * len(pieces[1]) + [1] * (len(pieces[2]) + 1)
        assert row["loss_mask"][:length].tolist() == expected and not row["loss_mask"][length:].any()
        masked = row["tokens"][prompt_len:length][row["loss_mask"][prompt_len:length] == 0]
        assert tok.decode(masked.tolist()) == tok.decode(tok.encode(observation))
        assert "</tool_response>" in tok.decode(masked.tolist())

        plain = {k: v for k, v in example.items() if k != "completion_segments"}
        unmasked = tokenize_sft_example(plain, tok, "plain", 120)
        assert int(unmasked["loss_mask"].sum()) == int(unmasked["attention_mask"].sum()) - prompt_len
        assert int(unmasked["loss_mask"].sum()) > int(row["loss_mask"].sum())


def test_segment_masks_survive_truncation_batching_and_length_stats(tool_examples, tool_tokenizer):
    tok, example = tool_tokenizer, tool_examples[0]
    full = tokenize_sft_example(example, tok, "plain", 120)
    length = int(full["attention_mask"].sum())
    for max_len in (length - 1, length - 12, 10):
        cut = tokenize_sft_example(example, tok, "plain", max_len)
        assert cut["truncated"] and cut["loss_mask"].tolist() == full["loss_mask"][:max_len].tolist()
    stats = sft_length_stats(tool_examples[:8], tok, template="plain", max_len=120)
    assert stats["max_tokens"] == max(
        int(tokenize_sft_example(e, tok, "plain", 120)["attention_mask"].sum()) for e in tool_examples[:8]
    )
    batch = next(
        iter(make_sft_dataset(tool_examples[:8], tok, template="plain", max_len=120, batch_size=4, seed=0))
    )
    for row, index in zip(batch["loss_mask"], batch["example_index"], strict=True):
        assert (
            row.tolist()
            == tokenize_sft_example(tool_examples[index], tok, "plain", 120)["loss_mask"].tolist()
        )
    prompt_and_ids = completion_tokens(example, tok)
    assert prompt_and_ids[0][-1] == tok.eos_id and prompt_and_ids[1][-1] == 1
    with pytest.raises(ValueError, match=r"completion_segments\[1\] must be a \(text, trainable\) pair"):
        completion_tokens({**example, "completion_segments": [("a", True), ("b",)]}, tok)


# --------------------------------------------------------------------------------------------------
# configs/tool_calculator.py
# --------------------------------------------------------------------------------------------------


def test_config_environment_renders_the_demonstrations_and_budgets_fit(tmp_path):
    """The GRPO section's environment (EnvConfig) answers the demonstration's call with its observation
    segment; the observation fits `max_observation_tokens`; both sweep points fit the sequence budgets."""
    config = _config()
    config.task.update(train_size=400, test_size=50)
    assert config.sampler == "engine" and config.grpo.max_tool_turns == 2
    env_config = EnvConfig.from_config(config.grpo, name="config.grpo")
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
            continue
        assert tokenizer.encode("</tool_call>")[-1] == tokenizer.token_to_id("</tool_call>")
        env = env_config.env_factory()()
        for example in task.train[:50]:
            (call, _), (observation, _), _ = example["completion_segments"]
            assert env.reset(example) == example["prompt"]
            assert env.step(call)[0] == observation
            assert len(tokenizer.encode(observation)) <= run.grpo.max_observation_tokens
        setup.check_tool_demonstrations(run, run.stages, task, tokenizer)  # "plain": the demos' format
        run.grpo.tool_format = "qwen2_5"
        with pytest.raises(ValueError, match=r"config.grpo.tool_format='qwen2_5': the task's tool-use demon"):
            setup.check_tool_demonstrations(run, run.stages, task, tokenizer)
        run.grpo.tool_format, run.grpo.env = "plain", "python"  # the right format, another env's tools
        with pytest.raises(
            ValueError,
            match=r"config.grpo.env='python' offers the tools \['python'\]; .* "
            r"call 'calculator'",
        ):
            setup.check_tool_demonstrations(run, run.stages, task, tokenizer)


@pytest.mark.slow
def test_runlocal_sft_stage_trains_with_the_tool_tokenizer(tmp_path):
    """`scripts/train.py --config=configs/tool_calculator.py:runlocal --config.stages="('sft',)"` has a pulse:
    two SFT steps with a finite loss, and the workdir's tokenizer holds `</tool_call>` as one token."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    repo = Path(CONFIG).parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(repo / "scripts" / "train.py"),
            f"--config={CONFIG}:runlocal",
            f"--workdir={tmp_path}",
            "--config.stages=('sft',)",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [m for m in lines if m["stage"] == "sft"]
    assert [m["step"] for m in sft] == [1, 2] and all(math.isfinite(m["loss"]) for m in sft)
    tokenizer = load_tokenizer(tmp_path / setup.TOKENIZER_FILE)
    assert tokenizer.encode("</tool_call>")[-1] == tokenizer.token_to_id("</tool_call>")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    from shared_runs import compilation_cache

    return compilation_cache(tmp_path_factory)


TOOL_RUN = (
    "--config.grpo.steps=4",
    "--config.checkpoint.keep_last=3",
    # a reward that varies between an untrained model's rows, so the updates move the params
    '--config.grpo.rewards=(("length_penalty", 1.0, {"max_len": 12}),)',
)


@pytest.mark.slow
def test_the_tool_config_trains_and_a_killed_multi_turn_run_reruns_to_the_same_metrics(tmp_path, xla_cache):
    """configs/tool_calculator.py:runlocal end to end (cold start, then GRPO on multi-turn rollouts with the
    calculator): some rows call the tool and get its answer; SIGKILL right after GRPO's third step (global
    step 4), the rerun resumes from the newest checkpoint and every metrics line, the tool counters
    included, equals the uninterrupted run's (a multi-turn rollout lives inside its step: fresh engine
    state and environments, the step's key)."""
    from test_resume import _complete_lines, assert_reproduces, run_and_kill
    from test_train_script import assert_ok, checkpoint_steps, metric_lines, train

    config = f"--config={CONFIG}:runlocal"
    reference = tmp_path / "reference"
    assert_ok(train(reference, *TOOL_RUN, cache=xla_cache, config=config))
    grpo = [x for x in metric_lines(reference) if x["stage"] == "grpo"]
    assert len(grpo) == 4 and sum(x["env/num_steps"] for x in grpo) > 0
    assert (
        max(x["turns/observation_tokens_mean"] for x in grpo[1:]) > 0
    )  # calls answered after the kill point
    assert all(x["grad_norm"] > 0 and math.isfinite(x["loss"]) for x in grpo)

    workdir = tmp_path / "run"

    def ready():
        lines = _complete_lines(workdir)
        return 3 in checkpoint_steps(workdir) and any(x["stage"] == "grpo" and x["step"] == 4 for x in lines)

    run_and_kill(
        workdir,
        tmp_path / "killed.log",
        xla_cache,
        ready,
        config=config,
        overrides=TOOL_RUN,
        HANG_AFTER="grpo:4",
    )
    result = train(workdir, *TOOL_RUN, cache=xla_cache, config=config)
    assert_ok(result)
    assert_reproduces(workdir, reference)
