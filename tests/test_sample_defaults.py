"""scripts/sample.py and scripts/evaluate.py sample a training workdir with the run's rollout settings
(temperature, top-p, top-k of its GRPO/PPO stage) unless a flag says otherwise, and print the settings
next to every sampled number.

The end-to-end tests read the session's shared quickstart runlocal workdir (tests/shared_runs.py),
whose GRPO stage samples at T=0.35 with top_k=1. Top-k = 1 makes sampling greedy, which the outputs
show exactly: with the run's defaults every sample of a prompt is the greedy completion; an explicit
--temperature / --top_k wins and the samples differ. The runlocal policy answers nothing right, so
evaluate.py's numbers are checked on a hand-built model that always gives one answer: right for a known
share of problems at any moderate temperature, and almost never at the T=200 a config's rollout stage
can ask for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from shared_runs import (
    QUICKSTART_EVALUATE,
    QUICKSTART_OVERRIDES,
    QUICKSTART_SAMPLE,
    quickstart_run,
    quickstart_script,
)

from grpo_jax.workdir import SamplingSettings, checkpoint_stage, run_sampling_settings

REPO = Path(__file__).resolve().parents[1]
RUN_OVERRIDES = ("--config.grpo.algo.temperature=0.35", "--config.grpo.top_k=1")


def _load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------------------------------------------
# Which settings a run's config gives
# ------------------------------------------------------------------------------------------------


def _run_config() -> ml_collections.ConfigDict:
    """Stages sft, grpo, rejection_sampling, sft2, grpo_final, ppo with distinct rollout settings."""
    c = ml_collections.ConfigDict()
    c.stages = ("sft", "grpo", "rejection_sampling", "sft2", "grpo_final", "ppo")
    c.sft = ml_collections.ConfigDict({"steps": 1})
    c.grpo = ml_collections.ConfigDict({"top_p": 0.95, "top_k": 0, "algo": {"temperature": 1.0}})
    c.rejection_sampling = ml_collections.ConfigDict({"temperature": 0.5, "top_p": 1.0, "top_k": 0})
    c.sft2 = ml_collections.ConfigDict({"steps": 1})
    c.grpo_final = ml_collections.ConfigDict({"top_p": 1.0, "top_k": 20, "algo": {"temperature": 0.7}})
    c.ppo = ml_collections.ConfigDict({"algo": {"temperature": 0.8}})  # top_p/top_k absent: off
    return c


@pytest.mark.parametrize(
    "stage, expected",
    [
        ("grpo", (1.0, 0.95, 0, "config.grpo of the run")),
        ("grpo_final", (0.7, 1.0, 20, "config.grpo_final of the run")),
        ("ppo", (0.8, 1.0, 0, "config.ppo of the run")),
        # Not a rollout stage: the nearest rollout stage before it (the policy was trained on those).
        ("rejection_sampling", (1.0, 0.95, 0, "config.grpo of the run (the checkpoint is from stage ")),
        ("sft2", (1.0, 0.95, 0, "config.grpo of the run (the checkpoint is from stage 'sft2')")),
        # Nothing before it: the first rollout stage after it.
        ("sft", (1.0, 0.95, 0, "config.grpo of the run (the checkpoint is from stage 'sft')")),
        # No stage (an HF directory evaluated with a run's config): the last rollout stage.
        (None, (0.8, 1.0, 0, "config.ppo of the run")),
    ],
)
def test_run_sampling_settings_follow_the_checkpoints_stage(stage, expected):
    settings = run_sampling_settings(_run_config(), stage)
    assert (settings.temperature, settings.top_p, settings.top_k) == expected[:3]
    assert settings.source.startswith(expected[3])


def test_shipped_configs_give_their_rollout_settings():
    quickstart = run_sampling_settings(_load_config("quickstart"))
    assert (quickstart.temperature, quickstart.top_p, quickstart.top_k) == (1.0, 1.0, 0)
    r1 = _load_config("r1_pipeline")
    assert run_sampling_settings(r1, "grpo_final").temperature == r1.grpo_final.algo.temperature
    assert run_sampling_settings(_load_config("ppo_baseline")).source == "config.ppo of the run"
    assert run_sampling_settings(_load_config("dpo")) is None  # no rollout stage: the caller's default


def test_explicit_values_win_one_by_one_and_the_label_shows_them():
    run = SamplingSettings(temperature=0.35, top_p=0.9, top_k=5, source="config.grpo of the run")
    assert run.override() is run
    assert run.describe() == "T=0.35, top_p=0.9, top_k=5"
    assert run.describe(k=8) == "T=0.35, top_p=0.9, top_k=5, k=8"
    mixed = run.override(temperature=1, top_k=0)
    assert (mixed.temperature, mixed.top_p, mixed.top_k) == (1.0, 0.9, 0)
    assert mixed.describe() == "T=1.0, top_p=0.9, top_k=0"
    assert mixed.source == "--temperature, --top_k; the rest from config.grpo of the run"
    assert SamplingSettings().describe() == "T=1.0, top_p=1.0, top_k=0"
    assert json.loads(json.dumps(mixed.to_dict()))["top_k"] == 0


# ------------------------------------------------------------------------------------------------
# The scripts on a workdir
# ------------------------------------------------------------------------------------------------


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ)  # one CPU device: faster than conftest's eight
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = quickstart_run(tmp_path_factory)
    assert set(RUN_OVERRIDES) <= set(QUICKSTART_OVERRIDES)  # what the tests below read back
    return path


def test_checkpoint_stage_reads_which_stage_saved_a_step(workdir):
    from grpo_jax.workdir import read_config

    assert checkpoint_stage(workdir, 2) == "sft" and checkpoint_stage(workdir, 4) == "grpo"
    sft = run_sampling_settings(read_config(workdir), checkpoint_stage(workdir, 2))
    assert (sft.temperature, sft.top_k) == (0.35, 1)  # the SFT policy is sampled as GRPO will sample it


def _groups(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_uses_the_runs_rollout_settings_unless_flags_say_otherwise(
    workdir, tmp_path, tmp_path_factory
):
    prompts = QUICKSTART_SAMPLE  # 2 prompts, 4 samples each; the run's settings: the session's one run
    stdout, out = quickstart_script(tmp_path_factory, "sample.py")
    assert "sampling: T=0.35, top_p=1.0, top_k=1 (from config.grpo of the run)" in stdout
    default = _groups(out)
    assert all(
        r["sampling"] == {"temperature": 0.35, "top_p": 1.0, "top_k": 1, "source": "config.grpo of the run"}
        for r in default
    )
    # top_k = 1 is greedy: every sample is the greedy completion.
    greedy = tmp_path / "greedy.jsonl"
    run_script("sample.py", f"--source={workdir}", *prompts, "--temperature=0", f"--out={greedy}")
    for run, argmax in zip(default, _groups(greedy), strict=True):
        assert {c["text"] for c in run["completions"]} == {argmax["completions"][0]["text"]}

    hot = tmp_path / "hot.jsonl"
    stdout = run_script(
        "sample.py", f"--source={workdir}", *prompts, "--temperature=3", "--top_k=0", f"--out={hot}"
    )
    assert (
        "sampling: T=3.0, top_p=1.0, top_k=0 (from --temperature, --top_k; the rest from config.grpo"
        in stdout
    )
    assert any(len({c["text"] for c in r["completions"]}) > 1 for r in _groups(hot))


def test_evaluate_prints_the_settings_next_to_every_number(workdir, tmp_path, tmp_path_factory):
    assert QUICKSTART_EVALUATE == ("--k=4",)  # the run's settings: the session's one run
    stdout, default_out = quickstart_script(tmp_path_factory, "evaluate.py")
    record = json.loads(default_out.read_text())
    assert record["sampling"]["temperature"] == 0.35 and record["sampling"]["top_k"] == 1
    lines = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("eval/")}
    assert lines["eval/accuracy"] == f"eval/accuracy {record['eval/accuracy']:.4f}  (greedy, T=0)"
    for key in ("eval/pass@k", "eval/maj@k"):
        assert lines[key] == f"{key} {record[key]:.4f}  (T=0.35, top_p=1.0, top_k=1, k=4)"
    assert "(sampling settings from config.grpo of the run)" in stdout

    out = tmp_path / "eval.json"
    stdout = run_script(
        "evaluate.py", f"--source={workdir}", "--k=4", "--temperature=2", "--top_k=0", f"--out={out}"
    )
    assert "eval/pass@k " in stdout and "  (T=2.0, top_p=1.0, top_k=0, k=4)" in stdout
    assert json.loads(out.read_text())["sampling"]["source"].startswith("--temperature, --top_k")


def _constant_answer_model(directory: Path, workdir: Path) -> float:
    """An HF directory (the workdir's tokenizer) whose model writes `<answer>A</answer>` after any prompt,
    A the most common answer of the runlocal test split that a chain of distinct tokens spells; returns
    the share of test problems A is right for.

    One layer with zero weights leaves the residual stream = the embedding, so the logits depend on the
    current token only: one-hot embeddings and an lm_head of weight 10 on each token's successor give a
    successor logit of 80 (RMSNorm scales a one-hot to sqrt(64)) against 0 for every other token.
    """
    import collections

    from grpo_jax import models
    from grpo_jax.data.templates import format_prompt
    from grpo_jax.testing import tiny_model_config, tiny_params
    from grpo_jax.tokenizers import load_tokenizer
    from grpo_jax.training import setup
    from grpo_jax.workdir import read_config

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    config = read_config(workdir)
    test = setup.build_task(config).test[: config.eval.num_problems]
    last_prompt_token = tokenizer.encode(format_prompt(config.template, "1+1"))[-1]
    for answer, _ in collections.Counter(e["answer"] for e in test).most_common():
        pieces = tokenizer.encode(f"<answer>{answer}</answer>")
        chain = [i for i in pieces if tokenizer.id_to_piece(i) != "▁"]
        if len(set(chain)) == len(chain) and last_prompt_token not in chain:
            break
    else:
        raise AssertionError("no test answer is spelled by distinct tokens")
    vocab, hidden = tokenizer.vocab_size, 64
    model_config = tiny_model_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_layers=1)
    params = jax.tree_util.tree_map(np.zeros_like, tiny_params(model_config))
    params["embed"] = np.eye(vocab, hidden, dtype=np.float32)
    params["final_norm"] = np.ones(hidden, np.float32)
    successor = np.full(vocab, chain[0])  # the prompt's last token (any token) starts the answer
    successor[chain] = [*chain[1:], tokenizer.eos_id]
    params["lm_head"] = np.zeros((hidden, vocab), np.float32)
    params["lm_head"][np.arange(vocab), successor] = 10.0
    models.save_pretrained(model_config, params, str(directory))
    tokenizer.save(directory / "tokenizer.model")
    return sum(e["answer"] == answer for e in test) / len(test)


def test_evaluate_samples_an_hf_model_at_the_configs_rollout_settings(workdir, tmp_path):
    hf = tmp_path / "constant"
    expected = _constant_answer_model(hf, workdir)
    config = f"--config={REPO / 'configs' / 'quickstart.py'}:runlocal"
    out = tmp_path / "eval.json"
    # The config's rollout stage samples at T=200: the answer chain almost never survives 4 samples.
    stdout = run_script(
        "evaluate.py", f"--source={hf}", config, "--config.grpo.algo.temperature=200", "--k=4", f"--out={out}"
    )
    record = json.loads(out.read_text())
    assert record["eval/accuracy"] == pytest.approx(expected) and expected > 0
    assert record["eval/pass@k"] < expected / 2
    assert record["sampling"]["source"] == "config.grpo of the run"
    assert f"eval/pass@k {record['eval/pass@k']:.4f}  (T=200.0, top_p=1.0, top_k=0, k=4)" in stdout
    # An explicit temperature wins: at T=1 every sample is the answer.
    stdout = run_script(
        "evaluate.py",
        f"--source={hf}",
        config,
        "--config.grpo.algo.temperature=200",
        "--k=4",
        "--temperature=1",
        f"--out={out}",
    )
    record = json.loads(out.read_text())
    for key in ("eval/accuracy", "eval/pass@k", "eval/maj@k"):
        assert record[key] == pytest.approx(expected), key
    assert f"eval/maj@k {expected:.4f}  (T=1.0, top_p=1.0, top_k=0, k=4)" in stdout
