"""scripts/sample.py, evaluate.py, convert_hf.py and grpo_jax.workdir.load_policy, plus 2-step runs of the
R1-Zero Countdown and GSM8K/Qwen2.5 configs through scripts/train.py.

The session's shared quickstart runlocal workdir (tests/shared_runs.py: all four checkpoints kept, SFT
steps 1-2, GRPO steps 3-4) is the source for the workdir tests. Exact-number checks: the restored SFT
params reproduce the held-out loss the trainer logged, the exported HF directory gives bit-identical
logits, and a hand-built bigram "model" that always answers the most common test answer gets exactly
that answer's share as accuracy, pass@k and maj@k.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from shared_runs import (
    QUICKSTART_EVALUATE,
    QUICKSTART_RUNLOCAL,
    QUICKSTART_SAMPLE,
    quickstart_run,
    quickstart_script,
)

from grpo_jax import models
from grpo_jax.workdir import load_policy, select_step

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """Subprocesses see one CPU device (faster than conftest's eight)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python scripts/NAME ARGS` (a benchmark script, `benchmarks/NAME`, where scripts/ has none)."""
    path = REPO / "scripts" / name
    path = path if path.exists() else REPO / "benchmarks" / name
    return subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _metric_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return quickstart_run(tmp_path_factory)


# ------------------------------------------------------------------------------------------------
# load_policy
# ------------------------------------------------------------------------------------------------


def test_restored_sft_params_reproduce_the_logged_heldout_loss(workdir):
    from grpo_jax import sharding
    from grpo_jax.data.pipeline import make_sft_dataset
    from grpo_jax.training import setup
    from grpo_jax.training.sft_step import make_sft_eval

    model_config, params, tokenizer, config = load_policy(workdir, step=2)  # end of SFT: no reference
    sft = config.sft
    heldout = next(
        iter(
            make_sft_dataset(
                setup.build_task(config).test,
                tokenizer,
                template=config.template,
                max_len=sft.max_len,
                batch_size=sft.batch_size,
                seed=config.seed,
                shuffle=False,
            )
        )
    )
    mesh = sharding.make_mesh(tuple(config.mesh))
    batch = sharding.shard_batch({k: heldout[k] for k in ("tokens", "attention_mask", "loss_mask")}, mesh)
    loss = float(make_sft_eval(model_config, chunk_size=config.logprob_chunk_size)(params, batch)["loss"])
    logged = [m for m in _metric_lines(workdir) if m["stage"] == "sft" and m["step"] == 2][0]["heldout/loss"]
    assert loss == pytest.approx(logged, rel=1e-5)


def test_grpo_checkpoint_with_reference_restores_and_best_is_the_most_accurate(workdir):
    assert select_step(workdir) == 4
    assert select_step(workdir, step=3) == 3
    # Checkpoints saved with an eval compete by eval/accuracy (ties: the later step); the run evaluates
    # at the end of each stage, steps 2 (SFT) and 4 (GRPO). (This tiny run usually scores 0 at both, so
    # the test below covers a best that is not the latest.)
    accuracy = {m["step"]: m["eval/accuracy"] for m in _metric_lines(workdir) if m["stage"] == "eval"}
    assert set(accuracy) == {2, 4}, accuracy
    best = max((value, step) for step, value in accuracy.items())[1]
    assert select_step(workdir, best=True) == best
    model_config, params, tokenizer, config = load_policy(workdir)  # GRPO stage, kl_coef > 0: has a reference
    assert config.stages == ["sft", "grpo"] and tokenizer.vocab_size == model_config.vocab_size
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


def test_best_is_the_most_accurate_checkpoint_else_the_latest(tmp_path):
    import jax.numpy as jnp

    from grpo_jax.checkpointing import Checkpointer, checkpoint_directory
    from grpo_jax.training.state import TrainState

    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params={"w": jnp.ones(2)},
        opt_state={},
        ref_params=None,
        reward_params={},
        rng=jax.random.key(0),
    )
    with Checkpointer(checkpoint_directory(tmp_path), keep_last=5, async_save=False) as checkpointer:
        for step in (1, 2, 3):
            assert checkpointer.save(step, state, extra={}, metrics={"reward/mean": 0.5})
    assert select_step(tmp_path, best=True) == 3  # no checkpoint carries eval/accuracy: the latest
    with Checkpointer(checkpoint_directory(tmp_path), keep_last=5, async_save=False) as checkpointer:
        for step, accuracy in ((4, 0.5), (5, 0.25)):
            assert checkpointer.save(step, state, extra={}, metrics={"eval/accuracy": accuracy})
    assert select_step(tmp_path, best=True) == 4  # the most accurate, not the latest


def test_loading_never_touches_the_checkpoint_folder(workdir):
    in_progress = workdir / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000"
    in_progress.mkdir()
    try:
        load_policy(workdir, step=3)
        assert in_progress.is_dir()  # a live run's unfinished save survives an evaluation next to it
    finally:
        in_progress.rmdir()


def test_a_damaged_newest_checkpoint_gives_way_to_the_next_older_one(workdir, tmp_path, caplog):
    """Readers (evaluate, sample, convert) load the newest intact checkpoint, name the damaged one in a
    warning and leave it in place; a damaged step asked for by number is an error."""
    from grpo_jax.checkpointing import DamagedCheckpointError

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    metadata = copy / "checkpoints" / "4" / "meta" / "metadata"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        _, params, _, _ = load_policy(copy)
    _, expected, _, _ = load_policy(workdir, step=3)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), params, expected)
    )
    assert any("checkpoint step 4" in r.getMessage() and "older" in r.getMessage() for r in caplog.records)
    assert (copy / "checkpoints" / "4").is_dir()
    with pytest.raises(DamagedCheckpointError, match="checkpoint step 4"):
        load_policy(copy, step=4)


def test_missing_sources_raise_one_clear_error(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such directory"):
        load_policy(tmp_path / "nope")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither a checkpoints/ folder"):
        load_policy(tmp_path / "fresh")
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 9; available: \\[1, 2, 3, 4\\]"):
        load_policy(workdir, step=9)


# ------------------------------------------------------------------------------------------------
# sample.py / evaluate.py
# ------------------------------------------------------------------------------------------------


def test_sample_prints_every_completion(tmp_path_factory):
    stdout, out = quickstart_script(tmp_path_factory, "sample.py")  # 2 prompts, 4 samples, <= 10 tokens
    assert QUICKSTART_SAMPLE == ("--prompt=12+34", "--prompt=7+8", "--num_samples=4", "--max_new_tokens=10")
    assert stdout.count("=== prompt: ") == 2 and "=== prompt: 7+8" in stdout
    assert stdout.count("--- sample ") == 8
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["12+34", "7+8"]
    assert all(
        len(r["completions"]) == 4 and 1 <= c["num_tokens"] <= 10 for r in records for c in r["completions"]
    )


def test_malformed_prompts_file_names_file_and_line(workdir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1"}\n\n{"prompt": 3}\n')
    result = run_script("sample.py", f"--source={workdir}", f"--prompts_file={prompts}")
    assert result.returncode == 1
    assert _last_line(result.stderr) == f"error: {prompts}:3: expected an object with a string 'prompt' field"
    prompts.write_text('{"prompt": "1+1"}\n{"prompt": \n')
    result = run_script("sample.py", f"--source={workdir}", f"--prompts_file={prompts}")
    assert result.returncode == 1 and _last_line(result.stderr).startswith(
        f"error: {prompts}:2: not valid JSON"
    )


def test_evaluate_workdir_matches_the_trainers_final_eval(workdir, tmp_path_factory):
    stdout, out = quickstart_script(tmp_path_factory, "evaluate.py")
    assert QUICKSTART_EVALUATE == ("--k=4",)
    for key in ("eval/accuracy", "eval/pass@k", "eval/maj@k"):
        assert f"\n{key} " in "\n" + stdout
    record = json.loads(out.read_text())
    final_eval = [m for m in _metric_lines(workdir) if m["stage"] == "eval"][-1]
    assert record["step"] == 4 and record["split"] == "test" and record["eval/k"] == 4
    assert record["eval/num_problems"] == final_eval["eval/num_problems"]
    assert record["eval/accuracy"] == final_eval["eval/accuracy"]  # greedy: the same decodes


def _bigram_hf_model(directory: Path, workdir: Path) -> str:
    """An HF directory whose model always writes `<answer>A</answer>` after the prompt template's last token,
    A the most common answer of the quickstart test split (among those a bigram chain can spell).

    One layer with every weight zero leaves the residual stream = embedding, so logits depend on the current
    token only: one-hot embeddings and an lm_head with weight 10 on each chosen successor make a bigram table
    (RMSNorm scales a one-hot to 8, so the chosen logit is 80 and sampling at temperature 1 is deterministic).
    """
    from grpo_jax.data.templates import format_prompt
    from grpo_jax.testing import tiny_model_config, tiny_params
    from grpo_jax.tokenizers import load_tokenizer
    from grpo_jax.training import setup
    from grpo_jax.workdir import read_config

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    config = read_config(workdir)
    counts = collections.Counter(
        e["answer"] for e in setup.build_task(config).test[: config.eval.num_problems]
    )
    last_prompt_token = tokenizer.encode(format_prompt(config.template, "1+1"))[-1]
    for answer, _ in counts.most_common():
        chain = [i for i in tokenizer.encode(f"<answer>{answer}</answer>") if tokenizer.id_to_piece(i) != "▁"]
        if len(set(chain)) == len(chain) and last_prompt_token not in chain:
            break
    else:
        raise AssertionError(f"no test answer can be spelled by a bigram chain: {counts}")
    vocab, hidden = tokenizer.vocab_size, 64
    model_config = tiny_model_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_layers=1)
    params = jax.tree_util.tree_map(np.zeros_like, tiny_params(model_config))
    params["embed"] = np.eye(vocab, hidden, dtype=np.float32)
    params["final_norm"] = np.ones(hidden, np.float32)
    successor = np.full(vocab, tokenizer.eos_id)
    for current, following in zip([last_prompt_token, *chain[:-1]], chain, strict=True):
        successor[current] = following
    params["lm_head"] = np.zeros((hidden, vocab), np.float32)
    params["lm_head"][np.arange(vocab), successor] = 10.0
    models.save_pretrained(model_config, params, str(directory))
    tokenizer.save(directory / "tokenizer.model")
    return answer


def test_sample_and_evaluate_an_hf_directory_exactly(workdir, tmp_path):
    hf = tmp_path / "bigram"
    answer = _bigram_hf_model(hf, workdir)
    stdout = _ok(
        run_script("sample.py", f"--source={hf}", "--prompt=2+2", "--num_samples=2", "--max_new_tokens=8")
    )
    assert stdout.count(f"\n<answer>{answer}</answer>\n") == 2

    from grpo_jax.training import setup
    from grpo_jax.workdir import read_config

    config = read_config(workdir)
    test = setup.build_task(config).test[: config.eval.num_problems]
    expected = sum(e["answer"] == answer for e in test) / len(test)
    assert expected > 0
    out = tmp_path / "eval.json"
    result = run_script("evaluate.py", f"--source={hf}", "--k=3", f"--out={out}")
    assert result.returncode == 1 and "give --config=configs/NAME.py" in _last_line(result.stderr)
    stdout = _ok(run_script("evaluate.py", f"--source={hf}", QUICKSTART_RUNLOCAL, "--k=3", f"--out={out}"))
    record = json.loads(out.read_text())
    assert record["step"] is None and record["eval/num_problems"] == len(test)
    for key in ("eval/accuracy", "eval/pass@k", "eval/maj@k"):
        assert record[key] == pytest.approx(expected, abs=1e-6), key
        assert f"{key} {expected:.4f}" in stdout


# ------------------------------------------------------------------------------------------------
# convert_hf.py
# ------------------------------------------------------------------------------------------------


def test_export_round_trip_gives_identical_logits(workdir, tmp_path):
    from grpo_jax.tokenizers import load_tokenizer

    hf = tmp_path / "hf"
    stdout = _ok(run_script("convert_hf.py", f"--workdir={workdir}", f"--out={hf}", "--step=3"))
    assert f"exported step 3 of {workdir}" in stdout
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == 1

    model_config, params, tokenizer, _ = load_policy(workdir, step=3)
    hf_config, hf_params = models.load_pretrained(str(hf))
    tokens = np.asarray([tokenizer.encode("Question: 12+34\nAnswer:")], np.int32)
    np.testing.assert_array_equal(
        np.asarray(models.forward(hf_config, hf_params, tokens)),
        np.asarray(models.forward(model_config, params, tokens)),
    )
    assert load_tokenizer(str(hf)).serialized_model() == tokenizer.serialized_model()

    stdout = _ok(run_script("convert_hf.py", f"--hf={hf}", "--check", "--text=12+34"))
    length = len(tokenizer.encode("12+34", add_bos=True))
    assert f"tokens (1, {length}) -> logits (1, {length}, {model_config.vocab_size}) float32" in stdout
    result = run_script("convert_hf.py", f"--workdir={workdir}", f"--out={hf}")
    assert (
        result.returncode == 1
        and _last_line(result.stderr) == f"error: {hf} already holds *.safetensors; choose an empty --out"
    )


# ------------------------------------------------------------------------------------------------
# The two new configs, 2 GRPO steps each
# ------------------------------------------------------------------------------------------------


def _check_two_grpo_steps(run: Path, host_reward: str) -> None:
    lines = _metric_lines(run)
    grpo = [m for m in lines if m["stage"] == "grpo"]
    assert [m["step"] for m in grpo] == [1, 2]
    assert all(host_reward in m and 0.0 <= m[host_reward] <= 1.0 for m in grpo)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["kl"]) for m in grpo)
    assert [m["stage"] for m in lines].count("eval") == 1
    assert select_step(run) == 2


def test_r1_zero_countdown_runlocal_trains(tmp_path):
    run = tmp_path / "countdown"
    _ok(
        run_script(
            "train.py", f"--config={REPO / 'configs' / 'r1_zero_countdown.py'}:runlocal", f"--workdir={run}"
        )
    )
    _check_two_grpo_steps(run, "host_reward/countdown")


def test_gsm8k_qwen2_5_runlocal_trains_from_a_tiny_hf_model(tmp_path):
    from grpo_jax.testing import tiny_model_config, tiny_params, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    qwen = tmp_path / "tiny_qwen2"
    config = tiny_model_config(
        vocab_size=tokenizer.vocab_size, architecture="qwen2", qkv_bias=True, tie_embeddings=True
    )
    models.save_pretrained(config, tiny_params(config), str(qwen))
    tokenizer.save(qwen / "tokenizer.model")
    problems = [(3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (1, 12)]
    lines = [
        json.dumps(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
        for a, b in problems
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[4:]) + "\n")

    run = tmp_path / "gsm8k"
    _ok(
        run_script(
            "train.py",
            f"--config={REPO / 'configs' / 'gsm8k_qwen2_5.py'}:runlocal",
            f"--workdir={run}",
            f"--config.model.pretrained={qwen}",
            f"--config.task.train_file={tmp_path / 'train.jsonl'}",
            f"--config.task.test_file={tmp_path / 'test.jsonl'}",
            "--config.model.attention_impl=chunked",  # the config's runtime fields reach a pretrained model
            "--config.model.attention_block_size=8",
        )
    )
    _check_two_grpo_steps(run, "host_reward/math_accuracy")
    model_config, params, loaded_tokenizer, _ = load_policy(run)  # the tokenizer comes from model.pretrained
    assert model_config.architecture == "qwen2" and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert (model_config.attention_impl, model_config.attention_block_size) == ("chunked", 8)


# ------------------------------------------------------------------------------------------------
# profile_step.py
# ------------------------------------------------------------------------------------------------


def test_profile_step_times_each_variant_and_lists_the_ops():
    bench = f"--config={REPO / 'configs' / 'bench_trl_d.py'}:runlocal"
    out = _ok(
        run_script(
            "profile_step.py", bench, "--variant=remat=none", "--variant=remat=dots,scan_layers=false",
            "--rounds=2", "--profile=grpo_step", "--top=3",
        )
    )  # fmt: skip
    timed = [line for line in out.splitlines() if " step median " in line]
    assert [line.split()[0] for line in timed] == ["remat=none", "remat=dots,scan_layers=False"], out
    assert all("% of the matmul rate" in line for line in timed)
    kinds = out.split("op kind | ms | share")[1].split("slowest ops")[0]
    rows = [line for line in kinds.splitlines() if line.count("|") == 2 and "---" not in line]
    assert rows and all(float(row.split("|")[1]) >= 0 for row in rows), out
    slowest = out.split("slowest ops | ms | shape and source")[1].splitlines()
    assert len([line for line in slowest if line.count("|") == 2]) == 3, out
    assert any("f32[" in line for line in slowest), out

    bad = run_script("profile_step.py", bench, "--variant=layers=3")
    assert bad.returncode != 0 and "['layers'] are not ModelConfig fields" in bad.stderr
