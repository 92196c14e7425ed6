"""Reward model hook: scalar head on the last real token, Bradley-Terry loss, registry wiring."""

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.rewards.registry import make_reward_fns
from grpo_jax.rewards.reward_model import (
    init_reward_head,
    init_reward_model,
    last_real_positions,
    reward_model_loss,
    reward_model_scores,
)
from grpo_jax.rewards.vocabulary import TokenSpec
from grpo_jax.testing import tiny_model_config

CONFIG = tiny_model_config()
SPEC = TokenSpec(
    think_open=2, think_close=3, answer_open=4, answer_close=5, stop_ids=(1,), pad_id=0, vocab_size=128
)
PARAMS = init_reward_model(CONFIG, jax.random.key(0))

PROMPTS = [[10, 11, 12], [20, 21]]
COMPLETIONS = [[30, 31, 1], [40, 41, 42, 43, 1]]


def layout(prompt_len, completion_len, pad_value):
    """Left-pad prompts and right-pad completions to the given widths, filling padding with pad_value."""
    n = len(PROMPTS)
    batch = {
        "prompt_tokens": np.full((n, prompt_len), pad_value, np.int32),
        "prompt_mask": np.zeros((n, prompt_len), np.int32),
        "completion_tokens": np.full((n, completion_len), pad_value, np.int32),
        "completion_mask": np.zeros((n, completion_len), np.int32),
    }
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        batch["prompt_tokens"][i, prompt_len - len(p) :], batch["prompt_mask"][i, prompt_len - len(p) :] = (
            p,
            1,
        )
        batch["completion_tokens"][i, : len(c)], batch["completion_mask"][i, : len(c)] = c, 1
    batch["truncated"] = np.zeros((n,), bool)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_head_init_and_last_real_positions():
    head = init_reward_head(32, jax.random.key(1))
    assert head["kernel"].shape == (32,) and head["bias"].shape == () and float(head["bias"]) == 0.0
    mask = jnp.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_real_positions(mask), [4, 0, 0])


def test_scores_are_finite_under_jit_and_read_the_last_real_token():
    batch = layout(4, 6, pad_value=0)
    tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
    scores = jax.jit(reward_model_scores, static_argnums=0)(CONFIG, PARAMS, tokens, mask)
    assert scores.shape == (2,) and scores.dtype == jnp.float32 and bool(jnp.isfinite(scores).all())

    from grpo_jax.models import forward_hidden

    hidden = forward_hidden(CONFIG, PARAMS["backbone"], tokens, attention_mask=mask)
    expected = [hidden[0, 6] @ PARAMS["head"]["kernel"], hidden[1, 8] @ PARAMS["head"]["kernel"]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_scores_depend_only_on_real_tokens():
    combined = make_reward_fns([("reward_model", 1.0)], SPEC, model_config=CONFIG)
    params = {"reward_model": PARAMS}
    compact_total, parts = jax.jit(combined)(layout(3, 5, pad_value=0), params)
    padded_total, _ = jax.jit(combined)(layout(7, 9, pad_value=77), params)
    np.testing.assert_allclose(padded_total, compact_total, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(parts["reward_model"], compact_total)

    changed = layout(3, 5, pad_value=0)
    changed["completion_tokens"] = changed["completion_tokens"].at[0, 0].set(99)
    changed_total, _ = jax.jit(combined)(changed, params)
    assert abs(float(changed_total[0] - compact_total[0])) > 1e-4
    np.testing.assert_allclose(changed_total[1], compact_total[1], rtol=1e-5, atol=1e-6)


def test_bradley_terry_loss():
    loss, metrics = reward_model_loss(jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0]))
    expected = (np.log1p(np.exp(-1.0)) + np.log(2.0) + np.log1p(np.exp(2.0))) / 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["rm/accuracy"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["rm/margin"], -1 / 3, rtol=1e-6)
    grad_chosen = jax.grad(lambda c: reward_model_loss(c, jnp.zeros(3))[0])(jnp.zeros(3))
    np.testing.assert_allclose(grad_chosen, [-0.5 / 3] * 3, rtol=1e-6)
