"""Process supervision (DeepSeekMath arXiv 2402.03300 §4.1.3) end to end: the arithmetic step verifier on
correct and broken chains, step ends mapped to real SentencePiece tokens, and the jitted GRPO step feeding
per-token process advantages to its loss (and outcome advantages when the switch is off)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from grpo_jax import models, sharding
from grpo_jax.algorithms import GRPOConfig, compute_advantages, process_advantages
from grpo_jax.algorithms.advantages import ADVANTAGE_ESTIMATORS, process_zero_variance_groups
from grpo_jax.data.tasks import ArithmeticTask
from grpo_jax.rewards import STEP_VERIFIERS, StepCheck, process_step_rewards, verify_arithmetic_steps
from grpo_jax.rewards import process as process_module
from grpo_jax.testing import tiny_model_config, tiny_params, tiny_tokenizer
from grpo_jax.training import OptimizerConfig, create_train_state, make_grpo_step, make_optimizer
from grpo_jax.training import grpo_step as grpo_step_module

ADD = {"prompt": "23+58", "answer": "81", "operation": "+", "operands": [23, 58], "task": "arithmetic"}
CHAIN = "<think> 3+8+0=11 , 2+5+1=8 </think> <answer> 81 </answer>"


def _judged(text, example=ADD, **kw):
    return [(c.kind, c.reward) for c in verify_arithmetic_steps(text, example, **kw)]


# --------------------------------------------------------------------------------------------------
# The verifier.
# --------------------------------------------------------------------------------------------------


def test_every_reference_chain_is_all_correct():
    task = ArithmeticTask(num_digits=(1, 3), operations=("+", "-", "*"), num_operands=(2, 3), seed=3)
    for example in task.split("train", 150):
        checks = verify_arithmetic_steps(example["completion"], example)
        assert all(c.correct and c.reward == 1.0 for c in checks), (example, checks)
        assert [c.kind for c in checks][-1] == "answer" and "missing" not in [c.kind for c in checks]
        assert [c.end for c in checks] == sorted(c.end for c in checks)


@pytest.mark.parametrize(
    "text, expected",
    [
        (CHAIN, [("step", 1), ("step", 1), ("answer", 1)]),
        # Wrong digit (7 is not 58's units digit); the next step takes the carry it wrote, so it is right.
        (
            "<think> 3+7+0=10 , 2+5+1=8 </think> <answer> 81 </answer>",
            [("step", 0), ("step", 1), ("answer", 1)],
        ),
        # Wrong carry into the tens column.
        (
            "<think> 3+8+0=11 , 2+5+0=7 </think> <answer> 71 </answer>",
            [("step", 1), ("step", 0), ("answer", 0)],
        ),
        # Wrong sum.
        (
            "<think> 3+8+0=12 , 2+5+1=8 </think> <answer> 81 </answer>",
            [("step", 0), ("step", 1), ("answer", 1)],
        ),
        ("<think> 3+8+0=11 </think> <answer> 81 </answer>", [("step", 1), ("missing", 0), ("answer", 1)]),
        (
            "<think> 3+8+0=11 , 2+5+1=8 , 0+0+0=0 </think> <answer> 81 </answer>",
            [("step", 1), ("step", 1), ("extra", 0), ("answer", 1)],
        ),
        (
            "<think> 3+8+0=11 , 2+5+1=8 </think> <answer> 80 </answer>",
            [("step", 1), ("step", 1), ("answer", 0)],
        ),
        ("<answer> 81 </answer>", [("missing", 0), ("answer", 1)]),
        ("<think> 3+8+0=11 , 2+5+1=8 </think>", [("step", 1), ("step", 1), ("answer", 0)]),
        (
            "<think> hello , 3+8 , = </think> <answer> 81 </answer>",
            [("step", 0), ("step", 0), ("extra", 0), ("answer", 1)],
        ),
        ("<think> , , </think> <answer> x </answer>", [("missing", 0), ("answer", 0)]),
        ("81 garbage </think> <think>", [("missing", 0), ("answer", 0)]),
        ("", [("missing", 0), ("answer", 0)]),
        # Spaces around operators are ignored, digits must still be single tokens of the chain.
        (
            "<think> 3 + 8 + 0 = 11 , 2+5+1 =8 </think> <answer>81</answer>",
            [("step", 1), ("step", 1), ("answer", 1)],
        ),
    ],
)
def test_addition_chains_exact_step_rewards(text, expected):
    checks = verify_arithmetic_steps(text, ADD)
    assert [(c.kind, c.reward) for c in checks] == expected
    for c in checks:
        assert 0 <= c.end <= len(text) and isinstance(c, StepCheck)
        if c.kind in ("step", "extra"):
            assert text[c.end - 1] not in " ,"  # ends right after the step's last character


def test_random_text_never_raises():
    rng = np.random.default_rng(0)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", " ", ",", "+", "-", "*", "=", "1", "9", "0", "x"]
    examples = [ADD, {"prompt": "52-17", "answer": "35"}, {"prompt": "23*45", "answer": "1035"}]
    for _ in range(300):
        text = "".join(rng.choice(atoms, size=int(rng.integers(0, 40))))
        for example in examples:
            checks = verify_arithmetic_steps(text, example)
            assert checks[-1].kind == "answer" and all(0 <= c.end <= len(text) for c in checks)
    runaway = "<think> 3+8+0=" + "9" * 5000 + " , 2+5+1=8 </think> <answer> 81 </answer>"
    assert _judged(runaway) == [("step", 0), ("step", 1), ("answer", 1)]


def test_step_ends_are_character_offsets():
    ends = [c.end for c in verify_arithmetic_steps(CHAIN, ADD)]
    assert [CHAIN[:e] for e in ends] == [
        "<think> 3+8+0=11",
        "<think> 3+8+0=11 , 2+5+1=8",
        CHAIN,
    ]


def test_carry_from_gold_and_configurable_rewards():
    slipped = "<think> 3+8+0=9 , 2+5+0=7 </think> <answer> 79 </answer>"
    assert _judged(slipped) == [("step", 0), ("step", 1), ("answer", 0)]
    assert _judged(slipped, carry_from="gold") == [("step", 0), ("step", 0), ("answer", 0)]
    assert _judged(slipped, correct_reward=2.0, wrong_reward=-1.0) == [
        ("step", -1),
        ("step", 2),
        ("answer", -1),
    ]
    with pytest.raises(ValueError, match="carry_from"):
        verify_arithmetic_steps(CHAIN, ADD, carry_from="previous")


def test_three_operands_subtraction_and_multiplication():
    three = {"prompt": "9+9+9", "answer": "27", "operation": "+", "operands": [9, 9, 9]}
    assert _judged("<think> 9+9+9+0=27 </think> <answer> 27 </answer>", three) == [("step", 1), ("answer", 1)]
    assert _judged("<think> 9+9+0=18 </think> <answer> 27 </answer>", three) == [("step", 0), ("answer", 1)]

    sub = {"prompt": "52-17", "answer": "35", "operation": "-", "operands": [52, 17]}
    assert _judged("<think> 12-7-0=5 , 5-1-1=3 </think> <answer> 35 </answer>", sub) == [
        ("step", 1),
        ("step", 1),
        ("answer", 1),
    ]
    # Forgot to borrow: the units step is wrong; the tens step takes the (absent) borrow it wrote.
    assert _judged("<think> 2-7-0=5 , 5-1-0=4 </think> <answer> 45 </answer>", sub) == [
        ("step", 0),
        ("step", 1),
        ("answer", 0),
    ]

    mul = {"prompt": "23*45", "answer": "1035", "operation": "*", "operands": [23, 45]}
    good = "<think> 23*5=115 , 23*40=920 , 115+920=1035 </think> <answer> 1035 </answer>"
    assert _judged(good, mul) == [("step", 1)] * 3 + [("answer", 1)]
    slip = "<think> 23*5=116 , 23*40=920 , 116+920=1036 </think> <answer> 1036 </answer>"
    assert _judged(slip, mul) == [("step", 0), ("step", 1), ("step", 1), ("answer", 0)]
    assert _judged(slip, mul, carry_from="gold") == [("step", 0), ("step", 1), ("step", 0), ("answer", 0)]


def test_problem_from_prompt_and_unsupported_operations():
    assert _judged(CHAIN, {"prompt": "23+58", "answer": "81"}) == [("step", 1), ("step", 1), ("answer", 1)]
    with pytest.raises(ValueError, match="unsupported operation '/'"):
        verify_arithmetic_steps(CHAIN, {"prompt": "8/2", "answer": "4"})
    with pytest.raises(ValueError, match="cannot read an arithmetic problem"):
        verify_arithmetic_steps(CHAIN, {"prompt": "Using the numbers [1, 2], make 3", "answer": "1+2"})
    assert STEP_VERIFIERS["arithmetic"] is verify_arithmetic_steps


# --------------------------------------------------------------------------------------------------
# Character offsets -> tokens, and the batch arrays.
# --------------------------------------------------------------------------------------------------

TEXTS = [
    CHAIN,
    "<think> 3+8+0=12 , 2+5+1=8 </think> <answer> 81 </answer>",
    "<think> 3+8+0=11 </think> <answer> 81 </answer>",
    "<think>3+8+0=11,2+5+1=8</think><answer>81</answer>",
    "<think> the fox , 3+8+0=11 , , Q 2+5 </think> <answer> 8 Q </answer> junk",  # Q is <unk>
    "<answer> 81",
    "",
]


def _batch(tokenizer, texts, *, lead_space=True, length=64):
    """Completions as the sampler emits them: right-padded, EOS then pad, mask 1 through EOS."""
    tokens = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode((" " if lead_space else "") + text) + [tokenizer.eos_id]
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    return tokens, mask


class _PiecesUnknown:
    """The tiny tokenizer with unusable pieces: forces the decoded-prefix path of the token mapping."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def decode(self, ids, *, skip_special=False):
        return self._tok.decode(ids, skip_special=skip_special)

    def id_to_piece(self, idx):
        return "\u2047"


@pytest.mark.parametrize("lead_space", [True, False])
def test_step_end_index_is_the_token_holding_the_steps_last_character(lead_space):
    tok = tiny_tokenizer()
    tokens, mask = _batch(tok, TEXTS, lead_space=lead_space)
    out = process_step_rewards(tok, tokens, mask, [ADD] * len(TEXTS), max_steps=6)
    assert out["step_rewards"].dtype == np.float32 and out["step_rewards"].shape == (len(TEXTS), 6)
    assert out["step_mask"].dtype == np.int32 and out["step_end_index"].dtype == np.int32
    slow = process_step_rewards(_PiecesUnknown(tok), tokens, mask, [ADD] * len(TEXTS), max_steps=6)
    for key in out:
        np.testing.assert_array_equal(out[key], slow[key], err_msg=key)

    for row in range(len(TEXTS)):
        ids = tokens[row, mask[row] > 0].tolist()
        text = tok.decode(ids, skip_special=True)
        checks = verify_arithmetic_steps(text, ADD)
        valid = out["step_mask"][row] > 0
        assert valid.sum() == len(checks)
        np.testing.assert_array_equal(out["step_rewards"][row, valid], [c.reward for c in checks])
        for check, k in zip(checks, out["step_end_index"][row, valid]):
            if check.end >= len(text.rstrip()):
                assert k == len(ids) - 1  # the step that ends the text ends on the stop token
                continue
            through = tok.decode(ids[: k + 1], skip_special=True)
            before = tok.decode(ids[:k], skip_special=True)
            assert len(before) < check.end <= len(through), (row, check, through)
            assert through[check.end - 1] == text[check.end - 1] != " "
    assert out["step_rewards"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert out["step_rewards"][1].tolist()[:3] == [0, 1, 1]


def test_max_steps_folds_overflow_and_keeps_the_answer():
    tok = tiny_tokenizer()
    long = "<think> 3+8+0=11 , 2+5+1=8 , 0+0+0=0 , 0+0+0=0 </think> <answer> 81 </answer>"
    tokens, mask = _batch(tok, [long, long])
    full = process_step_rewards(tok, tokens, mask, [ADD, ADD], max_steps=5)
    assert full["step_rewards"][0].tolist() == [1, 1, 0, 0, 1]
    folded = process_step_rewards(tok, tokens, mask, [ADD, ADD], max_steps=3)
    assert folded["step_rewards"][0].tolist() == [1, 0, 1]  # steps 2-4 folded: wrong, ends at step 4
    assert folded["step_end_index"][0].tolist() == [full["step_end_index"][0][i] for i in (0, 3, 4)]
    only_answer = process_step_rewards(tok, tokens, mask, [ADD, ADD], max_steps=1)
    assert only_answer["step_rewards"][0].tolist() == [1] and only_answer["step_mask"][0].tolist() == [1]

    none = process_step_rewards(tok, tokens, mask, [ADD, ADD], max_steps=3, verifier=lambda text, ex: [])
    assert not none["step_mask"].any() and not none["step_rewards"].any()
    with pytest.raises(ValueError, match="one per row"):
        process_step_rewards(tok, tokens, mask, [ADD], max_steps=3)


def test_fold_rule_directly():
    checks = [StepCheck(e, r, r > 0, "step") for e, r in [(1, 1.0), (2, 1.0), (3, 0.0), (4, 1.0)]]
    checks.append(StepCheck(9, 1.0, True, "answer"))
    folded = process_module._fit_steps(checks, 3)
    assert [(c.end, c.reward, c.kind) for c in folded] == [
        (1, 1.0, "step"),
        (4, 0.0, "folded"),
        (9, 1.0, "answer"),
    ]


# --------------------------------------------------------------------------------------------------
# Config and advantages.
# --------------------------------------------------------------------------------------------------


def test_config_accepts_process_and_checks_its_requirements():
    config = GRPOConfig(advantage_estimator="process", num_generations=4)
    assert config.advantage_kwargs == {"eps": 1e-6}
    with pytest.raises(ValueError, match="GRPOConfig.num_generations must be >= 2"):
        GRPOConfig(advantage_estimator="process", num_generations=1)
    with pytest.raises(ValueError, match="GRPOConfig.advantage_scale"):
        GRPOConfig(advantage_estimator="process", advantage_scale="batch")
    with pytest.raises(ValueError, match="GRPOConfig.kl_in_reward"):
        GRPOConfig(advantage_estimator="process", kl_in_reward=True)
    # The [N] -> [N] registry is unchanged; "process" is not an outcome estimator.
    assert "process" not in ADVANTAGE_ESTIMATORS
    with pytest.raises(ValueError, match="process_advantages"):
        compute_advantages("process", np.zeros(4, np.float32), 2)


def test_process_zero_variance_groups():
    step_rewards = np.array([[1, 0], [1, 1], [1, 1], [1, 9], [0, 0], [0, 0]], np.float32)
    step_mask = np.array([[1, 1], [1, 1], [1, 1], [1, 0], [1, 0], [0, 0]], np.int32)
    got = process_zero_variance_groups(step_rewards, step_mask, 2)
    assert np.asarray(got).tolist() == [False, False, True, True, True, True]


def test_quickstart_process_config():
    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart_process.py"
    spec = importlib.util.spec_from_file_location("configs_quickstart_process", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in (None, "runlocal"):
        config = module.get_config(variant)
        assert config.grpo.algo.advantage_estimator == "process"
        assert config.grpo.step_verifier in STEP_VERIFIERS and config.grpo.max_steps >= 3
        GRPOConfig.from_dict(config.grpo.algo)
    assert module.get_config("runlocal").grpo.steps == 2
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("nope")


# --------------------------------------------------------------------------------------------------
# The jitted step.
# --------------------------------------------------------------------------------------------------

SMALL = {"prompt": "7+5", "answer": "12", "operation": "+", "operands": [7, 5]}
STEP_TEXTS = [
    CHAIN,  # [1, 1, 1]
    "<think> 3+8+0=12 , 2+5+1=8 </think> <answer> 81 </answer>",  # [0, 1, 1]
    "<think> 7+5+0=12 </think> <answer> 12 </answer>",  # [1, 1]
    "<think> 7+5+0=12 </think> <answer> 13 </answer>",  # [1, 0]
]
STEP_EXAMPLES = [ADD, ADD, SMALL, SMALL]


def _step_batch(tok, length=40, prompt_len=8):
    tokens, mask = _batch(tok, STEP_TEXTS, length=length)
    prompt_tokens = np.zeros((4, prompt_len), np.int32)
    prompt_mask = np.zeros((4, prompt_len), np.int32)
    for row, example in enumerate(STEP_EXAMPLES):
        ids = tok.encode(example["prompt"])
        prompt_tokens[row, -len(ids) :], prompt_mask[row, -len(ids) :] = ids, 1  # left-padded
    batch = {
        "prompt_tokens": prompt_tokens,
        "prompt_mask": prompt_mask,
        "completion_tokens": tokens,
        "completion_mask": mask,
        "truncated": np.zeros(4, bool),
        "host_rewards": np.array([1, 1, 1, 0], np.float32),  # answer correctness: the outcome reward
    }
    batch.update(process_step_rewards(tok, tokens, mask, STEP_EXAMPLES, max_steps=4))
    return batch


def _run_step(monkeypatch, grpo, batch):
    """One step on the tiny model (ratio 1: old logprobs are the policy's); returns (metrics, the
    advantages the loss received)."""
    seen = []

    def recording_loss(params, mb, **kw):
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), mb["advantages"])
        return original(params, mb, **kw)

    original = grpo_step_module.grpo_loss
    monkeypatch.setattr(grpo_step_module, "grpo_loss", recording_loss)
    config = tiny_model_config(vocab_size=tiny_tokenizer().vocab_size)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    shardings = models.model_param_shardings(mesh, config)
    params = jax.device_put(tiny_params(config), shardings)
    state, state_sh = create_train_state(
        params, optimizer, mesh, shardings, rng=jax.random.key(0), with_reference=False
    )
    batch = dict(batch)
    batch["old_logprobs"] = grpo_step_module.completion_logprobs(
        config, params, batch, temperature=grpo.temperature, chunk_size=128
    )
    step = make_grpo_step(grpo, config, optimizer, mesh=mesh, state_shardings=state_sh)
    _, metrics = step(state, batch)
    jax.effects_barrier()
    return jax.device_get(metrics), seen[-1]


def _expected_process_advantages(batch):
    """By hand. Group 0 step rewards {1,1,1, 0,1,1}: mean 5/6, Bessel std sqrt(1/6), so 1 -> a = sqrt(1/6)
    and 0 -> b = -5 sqrt(1/6). Group 1 {1,1, 1,0}: mean 3/4, std 1/2, so 1 -> 0.5 and 0 -> -1.5. Token t
    sums the normalised rewards of the steps ending at or after t."""
    a, b = np.sqrt(1 / 6), -5 * np.sqrt(1 / 6)
    normalised = [[a, a, a], [b, a, a], [0.5, 0.5], [0.5, -1.5]]
    expected = np.zeros(batch["completion_mask"].shape, np.float64)
    for row, values in enumerate(normalised):
        ends = batch["step_end_index"][row, : len(values)]
        for value, end in zip(values, ends):
            expected[row, : end + 1] += value
    return expected


def test_step_gives_the_loss_per_token_process_advantages(monkeypatch):
    tok = tiny_tokenizer()
    batch = _step_batch(tok)
    assert batch["step_rewards"].tolist() == [[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    grpo = GRPOConfig(advantage_estimator="process", num_generations=2, kl_coef=0.0, loss_agg="token_mean")
    metrics, advantages = _run_step(monkeypatch, grpo, batch)

    expected = _expected_process_advantages(batch)
    assert advantages.shape == batch["completion_mask"].shape  # per token, [N, L]
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
    library = process_advantages(
        batch["step_rewards"], batch["step_mask"], batch["step_end_index"], 2, expected.shape[1]
    )
    np.testing.assert_allclose(advantages, library, rtol=1e-6, atol=1e-6)
    assert advantages[0, 0] == pytest.approx(3 * np.sqrt(1 / 6), rel=1e-5)
    assert advantages[3, 0] == pytest.approx(-1.0, rel=1e-5)

    # Ratio 1, no KL: the token-mean surrogate loss is minus the token mean of the advantages.
    mask = batch["completion_mask"] > 0
    assert float(metrics["pg_loss"]) == pytest.approx(-expected[mask].mean(), abs=1e-4)
    assert float(metrics["reward/mean"]) == pytest.approx(0.75)  # outcome rewards are still logged
    assert float(metrics["process/step_reward_mean"]) == pytest.approx(8 / 10)
    assert float(metrics["process/steps_per_sample"]) == pytest.approx(10 / 4)
    assert float(metrics["advantage/mean_abs"]) == pytest.approx(np.abs(expected[mask]).mean(), rel=1e-4)


def test_switch_off_gives_outcome_advantages(monkeypatch):
    tok = tiny_tokenizer()
    batch = _step_batch(tok)
    grpo = GRPOConfig(advantage_estimator="grpo", num_generations=2, kl_coef=0.0, loss_agg="token_mean")
    _, advantages = _run_step(monkeypatch, grpo, batch)
    assert advantages.shape == (4,)  # one per completion
    # Group 0's outcome rewards tie (both answers right): outcome advantage 0, process advantage not.
    np.testing.assert_allclose(advantages, [0, 0, 1 / np.sqrt(2), -1 / np.sqrt(2)], atol=1e-5)
    per_token = np.broadcast_to(advantages[:, None], batch["completion_mask"].shape)
    assert not np.allclose(per_token, _expected_process_advantages(batch), atol=1e-3)


def test_process_step_without_step_keys_raises():
    config = tiny_model_config(vocab_size=tiny_tokenizer().vocab_size)
    grpo = GRPOConfig(advantage_estimator="process", num_generations=2, kl_coef=0.0)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig())
    params = jax.device_put(tiny_params(config), models.model_param_shardings(mesh, config))
    state, _ = create_train_state(
        params,
        optimizer,
        mesh,
        models.model_param_shardings(mesh, config),
        rng=jax.random.key(0),
        with_reference=False,
    )
    batch = {k: v for k, v in _step_batch(tiny_tokenizer()).items() if k != "step_end_index"}
    batch["old_logprobs"] = np.zeros(batch["completion_mask"].shape, np.float32)
    step = make_grpo_step(grpo, config, optimizer, mesh=mesh, donate=False)
    with pytest.raises(ValueError, match="needs the batch keys step_end_index"):
        step(state, batch)
