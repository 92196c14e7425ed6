"""Shared-prefix training (issue 10): each prompt's forward computed once per group of G rows gives the
same completion logprobs, entropies and gradients as the per-row forward (fp32, tight tolerance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models
from grpo_jax.models import ModelConfig

B, G, P, L = 3, 4, 7, 6


def _config(**kw):
    base = dict(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        tie_embeddings=False, dtype="float32", param_dtype="float32",
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 40, (B, P))
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[0, :3] = 0  # left padding of different lengths
    prompt_mask[1, :1] = 0
    completions = rng.integers(3, 40, (B * G, L))
    completion_mask = np.ones((B * G, L), np.int32)
    for row, length in enumerate(rng.integers(1, L + 1, B * G)):
        completion_mask[row, length:] = 0
    return dict(
        prompt_tokens=jnp.asarray(np.repeat(prompts * prompt_mask, G, axis=0), jnp.int32),
        prompt_mask=jnp.asarray(np.repeat(prompt_mask, G, axis=0)),
        completion_tokens=jnp.asarray(completions * completion_mask, jnp.int32),
        completion_mask=jnp.asarray(completion_mask),
    )


def _logprobs(config, params, batch, shared, with_entropy=True):
    args = (config, params, batch["prompt_tokens"], batch["prompt_mask"])
    args += (batch["completion_tokens"], batch["completion_mask"])
    kw = dict(temperature=0.7, chunk_size=4, with_entropy=with_entropy)
    if shared:
        return models.completion_logprobs_shared_prefix(*args, group_size=G, **kw)
    return models.completion_logprobs(*args, **kw)


@pytest.mark.parametrize("remat,scan", [("none", True), ("full", False)])
def test_shared_prefix_matches_per_row_forward_values_and_gradients(remat, scan):
    config = _config(remat=remat, scan_layers=scan)
    params = models.init_params(config, jax.random.key(0))
    batch = _batch()
    mask = batch["completion_mask"] > 0
    logprobs = jax.jit(_logprobs, static_argnums=(0, 3))
    (lp_ref, ent_ref), (lp, ent) = (logprobs(config, params, batch, s) for s in (False, True))
    np.testing.assert_allclose(np.where(mask, lp, 0), np.where(mask, lp_ref, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.where(mask, ent, 0), np.where(mask, ent_ref, 0), rtol=1e-5, atol=1e-5)

    weights = jax.random.normal(jax.random.key(1), mask.shape)

    def loss(p, shared):
        lp, ent = _logprobs(config, p, batch, shared)
        return jnp.sum(jnp.where(mask, weights * lp + 0.1 * ent, 0.0))

    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    grads_ref, grads = grad_fn(params, False), grad_fn(params, True)
    for (path, g_ref), g in zip(
        jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree_util.tree_leaves(grads)
    ):
        scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
        assert float(jnp.max(jnp.abs(g - g_ref))) <= 1e-5 * scale, jax.tree_util.keystr(path)
        assert scale > 1e-8, f"{jax.tree_util.keystr(path)} has no gradient: the check would be vacuous"


def test_completion_logprobs_equals_the_full_sequence_token_logprobs():
    config = _config()
    params = models.init_params(config, jax.random.key(2))
    batch = _batch(1)
    tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
    full = jax.jit(
        lambda p: models.token_logprobs(config, p, tokens, attention_mask=mask, temperature=0.7, chunk_size=4)
    )(params)
    got = jax.jit(lambda p: _logprobs(config, p, batch, shared=False, with_entropy=False))(params)
    np.testing.assert_allclose(got, full[:, P - 1 :], rtol=1e-6, atol=1e-6)


def test_shared_prefix_rejects_a_group_size_that_does_not_divide_the_rows():
    config = _config()
    params = models.init_params(config, jax.random.key(0))
    batch = _batch()
    with pytest.raises(ValueError, match="group_size=5 must divide the 12 completion rows"):
        models.completion_logprobs_shared_prefix(
            config, params, *(batch[k] for k in ("prompt_tokens", "prompt_mask")),
            batch["completion_tokens"], batch["completion_mask"], group_size=5,
        )  # fmt: skip
