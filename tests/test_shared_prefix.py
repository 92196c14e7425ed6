"""Shared-prefix training: each prompt's forward computed once per group of G rows gives the
same completion logprobs, entropies and gradients as the per-row forward (fp32, tight tolerance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sampling
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.models import ModelConfig
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    make_grpo_step,
    make_optimizer,
    rollout_to_batch,
)

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
    """One program per path gives the forward's values (the loss's aux) and the gradient: the values
    compared are the forward the gradient is taken through. (The forward alone, shared prefix and
    per row, is compared per minibatch in test_reference_logprobs_per_minibatch_equal_the_whole_batch.)"""
    config = _config(remat=remat, scan_layers=scan)
    params = models.init_params(config, jax.random.key(0))
    batch = _batch()
    mask = batch["completion_mask"] > 0
    weights = jax.random.normal(jax.random.key(1), mask.shape)

    def loss(p, shared):
        lp, ent = _logprobs(config, p, batch, shared)
        return jnp.sum(jnp.where(mask, weights * lp + 0.1 * ent, 0.0)), (lp, ent)

    grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (grads_ref, (lp_ref, ent_ref)), (grads, (lp, ent)) = grad_fn(params, False), grad_fn(params, True)
    np.testing.assert_allclose(np.where(mask, lp, 0), np.where(mask, lp_ref, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.where(mask, ent, 0), np.where(mask, ent_ref, 0), rtol=1e-5, atol=1e-5)
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


def test_grpo_step_with_shared_prefix_equals_the_per_row_step_on_a_2x2x2_mesh():
    """Reference and policy both through the shared prefix, two minibatches (groups of G / 2 rows in each),
    β > 0 with a reference unlike the policy: the same metrics and updated params as the per-row step."""

    config = tiny_model_config(vocab_size=32)
    grpo = GRPOConfig(num_generations=4, num_minibatches=2, num_iterations=2, kl_coef=0.05, temperature=1.0)
    mesh = mesh_2x2x2()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0))
    shardings = models.model_param_shardings(mesh, config)

    def reward(batch, params):
        r = jnp.sum((batch["completion_tokens"] % 3 == 0) * batch["completion_mask"], axis=-1)
        return r.astype(jnp.float32), {"threes": r.astype(jnp.float32)}

    tokens = np.tile(np.arange(3, 10, dtype=np.int32), (4, 1)) + np.arange(4)[:, None]
    mask = np.ones_like(tokens)
    mask[::2, :3] = 0
    rollout = sampling.generate(
        config,
        tiny_params(config, seed=0),
        tokens,
        mask,
        jax.random.key(1),
        num_samples=4,
        max_new_tokens=5,
        eos_id=1,
    )
    batch = rollout_to_batch(rollout, {}, 4)
    results = []
    for shared in (False, True):
        params = jax.device_put(tiny_params(config, seed=0), shardings)
        state, state_sh = create_train_state(
            params, optimizer, mesh, shardings, rng=jax.random.key(0), with_reference=True
        )
        ref = jax.device_put(tiny_params(config, seed=3), shardings)
        state = state.replace(ref_params=ref)
        step = make_grpo_step(
            grpo,
            config,
            optimizer,
            reward_fn=reward,
            mesh=mesh,
            state_shardings=state_sh,
            shared_prefix=shared,
        )
        new_state, metrics = step(state, batch)
        results.append(jax.device_get((new_state.params, metrics)))
    (params_ref, metrics_ref), (params_shared, metrics_shared) = results
    assert metrics_ref["kl"] > 1e-4 and metrics_ref["grad_norm"] > 1e-4  # a real update to compare
    for name in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "clip_frac", "reward/mean"):
        np.testing.assert_allclose(
            metrics_shared[name], metrics_ref[name], rtol=2e-5, atol=1e-6, err_msg=name
        )
    # Adam divides by sqrt(v): on elements whose gradient is ~0, float reassociation noise moves the update
    # by a sliver of the step size (lr 1e-2); 1 % of one step is far below what a wrong gradient would do.
    for a, b in zip(jax.tree_util.tree_leaves(params_shared), jax.tree_util.tree_leaves(params_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_shared_prefix_refuses_minibatches_that_split_a_group():

    grpo = GRPOConfig(num_generations=4, num_minibatches=8)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    with pytest.raises(ValueError, match="shared_prefix needs num_generations=4 divisible by"):
        make_grpo_step(grpo, tiny_model_config(vocab_size=32), optimizer, shared_prefix=True)


# (4, True) would be (4, False) again: with G/M = 1 row of a prompt per minibatch, completion_logprobs
# takes the per-row forward (shared_prefix_group=1), so the shared-prefix case is M=2 (2 rows a prompt).
@pytest.mark.parametrize("num_minibatches, shared", [(2, False), (4, False), (2, True)])
def test_reference_logprobs_per_minibatch_equal_the_whole_batch(num_minibatches, shared):
    """The step's reference forward runs one minibatch at a time (`minibatch_logprobs`, lax.map over
    the interleaved split) and reassembles [N, L] in row order: the values of the whole-batch forward.
    With shared_prefix each minibatch holds G/M rows of every prompt."""
    from grpo_jax.training.grpo_step import completion_logprobs
    from grpo_jax.training.minibatches import minibatch_logprobs

    config = _config()
    params = tiny_params(config, seed=3)
    batch = _batch(seed=4)
    whole = _logprobs(config, params, batch, shared=False, with_entropy=False)

    def per_minibatch(p, mb):
        group = G // num_minibatches if shared else 1
        return completion_logprobs(config, p, mb, temperature=0.7, chunk_size=4, shared_prefix_group=group)

    got = jax.jit(lambda p, b: minibatch_logprobs(per_minibatch, p, b, num_minibatches))(params, batch)
    assert got.shape == whole.shape
    valid = np.asarray(batch["completion_mask"]) > 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(whole)[valid], rtol=1e-5, atol=1e-5)
