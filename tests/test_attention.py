"""Attention backends against the "xla" reference: forward values and gradients (fp32, tight tolerance)
across GQA ratios, left padding, causal offsets, block sizes that do and do not divide T, T = 1, fully
masked rows; partial attentions merged by their log-sum-exp; the model's forward, shared-prefix logprobs
and the one-program GRPO step with every backend that runs on CPU; and one-line errors where a backend
cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models
from grpo_jax.models import attention as attn
from grpo_jax.testing import tiny_model_config, tiny_params

TOL = dict(rtol=2e-5, atol=2e-6)


def _qkv(seed, b, t, s, heads, kv_heads, dh=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, heads, dh), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, kv_heads, dh), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, kv_heads, dh), jnp.float32)
    return q, k, v


def _left_padded(b, s, pads):
    return jnp.asarray([[i >= pad for i in range(s)] for pad in pads[:b]])


CASES = [  # (T, S, heads, kv heads, block, causal offset or None, left pads)
    (7, 7, 4, 2, 3, 0, (0, 2)),  # blocks that do not divide T, GQA 2
    (8, 8, 4, 4, 4, 0, (3, 0)),  # MHA, blocks that divide
    (8, 8, 4, 1, 8, 0, (0, 7)),  # MQA, one block, a row with one real key
    (1, 9, 6, 2, 4, 8, (1, 0)),  # T = 1: a decode step at slot 8
    (5, 12, 4, 2, 4, 7, (0, 4)),  # queries at slots 7..11 of a cache
    (6, 10, 4, 2, 4, None, (2, 0)),  # not causal (a prompt's keys seen by completion queries)
    (5, 5, 4, 2, 2, 0, (5, 1)),  # a row with no real key at all: zeros, no NaN
]


@pytest.mark.parametrize("t, s, heads, kv_heads, block, offset, pads", CASES)
def test_chunked_equals_xla_values_lse_and_gradients(t, s, heads, kv_heads, block, offset, pads):
    q, k, v = _qkv(t * 100 + s, 2, t, s, heads, kv_heads)
    mask = attn.AttentionMask(_left_padded(2, s, pads), offset)
    want_out, want_lse = attn.attend_with_lse(q, k, v, mask, impl="xla")
    got_out, got_lse = attn.attend_with_lse(q, k, v, mask, impl="chunked", block_size=block)
    np.testing.assert_allclose(got_out, want_out, **TOL)
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(got_lse), finite)
    np.testing.assert_allclose(np.asarray(got_lse)[finite], np.asarray(want_lse)[finite], **TOL)
    np.testing.assert_allclose(attn.attend(q, k, v, mask, impl="xla"), want_out, **TOL)
    assert np.isfinite(np.asarray(got_out)).all()

    # A loss that reads both outputs, so the lse's cotangent is exercised too.
    weights = jax.random.normal(jax.random.key(9), want_out.shape)
    lse_weights = jax.random.normal(jax.random.key(10), want_lse.shape)

    def loss(impl, q, k, v):
        out, lse = attn.attend_with_lse(q, k, v, mask, impl=impl, block_size=block)
        return jnp.sum(out * weights) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * lse_weights)

    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, err_msg=f"d{name}", **TOL)
    assert float(jnp.abs(got[1]).max()) > 1e-3


def test_partial_attentions_merge_into_the_attention_over_the_union():
    """Keys split into a non-causal prefix and a causal own part: merging the two partials by their
    log-sum-exp gives the attention over the concatenation, values and gradients."""
    p, t = 5, 4
    q, k, v = _qkv(3, 2, t, p + t, 4, 2)
    valid = _left_padded(2, p + t, (2, 0))
    whole = attn.AttentionMask(valid, p)  # completion query i sits at key index p + i

    def merged(q, k, v):
        first = attn.attend_with_lse(q, k[:, :p], v[:, :p], attn.full_mask(valid[:, :p]), impl="chunked")
        second = attn.attend_with_lse(
            q, k[:, p:], v[:, p:], attn.causal_mask(valid[:, p:]), impl="chunked", block_size=3
        )
        return attn.merge_partials(first, second)

    np.testing.assert_allclose(merged(q, k, v), attn.attend(q, k, v, whole), **TOL)
    weights = jax.random.normal(jax.random.key(1), q.shape)
    want = jax.grad(lambda *a: jnp.sum(attn.attend(*a, whole) * weights), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: jnp.sum(merged(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **TOL)


# ------------------------------------------------------------------------------------------------
# In the model
# ------------------------------------------------------------------------------------------------

CONFIG = tiny_model_config(vocab_size=32)


def _batch(n=4, p=6, length=5, seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, 32, (n, p)).astype(np.int32)
    prompt_mask = np.ones_like(prompt)
    prompt_mask[::2, :2] = 0  # left padding
    completion = rng.integers(2, 32, (n, length)).astype(np.int32)
    completion_mask = (np.arange(length)[None] < np.array([5, 3, 1, 4][:n])[:, None]).astype(np.int32)
    return tuple(map(jnp.asarray, (prompt, prompt_mask, completion, completion_mask)))


def test_model_forward_and_logprob_gradients_with_the_chunked_backend():
    params = tiny_params(CONFIG, seed=0)
    prompt, prompt_mask, completion, completion_mask = _batch()
    chunked = CONFIG.replace(attention_impl="chunked", attention_block_size=4)
    tokens = jnp.concatenate([prompt, completion], 1)
    mask = jnp.concatenate([prompt_mask, completion_mask], 1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(models.forward(chunked, params, tokens, attention_mask=mask))[real],
        np.asarray(models.forward(CONFIG, params, tokens, attention_mask=mask))[real],
        **TOL,
    )

    def loss(config, params, shared):
        args = (config, params, prompt, prompt_mask, completion, completion_mask)
        if shared:
            logp = models.completion_logprobs_shared_prefix(*args, group_size=2, chunk_size=4)
        else:
            logp = models.completion_logprobs(*args, chunk_size=4)
        return jnp.sum(jnp.where(completion_mask > 0, logp, 0.0)), logp

    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=(0, 2))
    for shared in (False, True):
        (want, want_logp), want_grads = grad(CONFIG, params, shared)
        (got, got_logp), got_grads = grad(chunked, params, shared)
        valid = np.asarray(completion_mask, bool)
        np.testing.assert_allclose(np.asarray(got_logp)[valid], np.asarray(want_logp)[valid], **TOL)
        jax.tree_util.tree_map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6), got_grads, want_grads
        )


def test_splash_in_interpret_mode_equals_xla_in_the_model():
    """The Pallas splash kernel (interpret mode on CPU: the code path a TPU runs, minus the chip) gives the
    reference's logprobs and gradients, for the full forward and for shared-prefix training (where the
    prompt's keys are broadcast to the group's rows: the kernel's log-sum-exp is not differentiable)."""
    params = tiny_params(CONFIG, seed=1)
    prompt, prompt_mask, completion, completion_mask = _batch(seed=1)
    splash = CONFIG.replace(attention_impl="splash", attention_interpret=True)
    valid = np.asarray(completion_mask, bool)

    def loss(config, params, shared):
        args = (config, params, prompt, prompt_mask, completion, completion_mask)
        if shared:
            logp = models.completion_logprobs_shared_prefix(*args, group_size=2, chunk_size=4)
        else:
            logp = models.completion_logprobs(*args, chunk_size=4)
        return jnp.sum(jnp.where(completion_mask > 0, logp, 0.0)), logp

    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=(0, 2))
    for shared in (False, True):
        (_, want_logp), want_grads = grad(CONFIG, params, shared)
        (_, got_logp), got_grads = grad(splash, params, shared)
        np.testing.assert_allclose(np.asarray(got_logp)[valid], np.asarray(want_logp)[valid], **TOL)
        jax.tree_util.tree_map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6), got_grads, want_grads
        )


def test_splash_and_cudnn_say_where_they_can_run():
    q, k, v = _qkv(0, 1, 4, 4, 4, 2)
    mask = attn.causal_mask(jnp.ones((1, 4), bool))
    with pytest.raises(
        ValueError, match=r"attention_impl='cudnn' needs an NVIDIA GPU, but the program runs on cpu"
    ):
        attn.attend(q, k, v, mask, impl="cudnn")
    with pytest.raises(
        ValueError, match=r"attention_impl='splash' needs a TPU, but the program runs on cpu: use interpret"
    ):
        attn.attend(q, k, v, mask, impl="splash")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        CONFIG.replace(attention_impl="flash")


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_the_grpo_step_compiles_once_and_trains_with_every_cpu_backend(shared_prefix):
    """The one-program GRPO step with "chunked" and "splash" (interpret mode): one compile over two steps,
    the parameters move, and every update's metrics equal the "xla" step's."""
    from test_grpo_step import CONFIG as STEP_CONFIG
    from test_grpo_step import _host, _setup

    from grpo_jax.algorithms import GRPOConfig

    grpo = GRPOConfig(num_generations=4, kl_coef=0.04)
    results = {}
    for impl in ("xla", "chunked", "splash"):
        config = STEP_CONFIG.replace(attention_impl=impl, attention_block_size=4, attention_interpret=True)
        state, step, batch, _ = _setup(grpo, model_config=config, shared_prefix=shared_prefix, donate=False)
        before = _host(state.params)
        metrics = []
        for _ in range(2):
            state, m = step(state, batch)
            metrics.append({k: float(v) for k, v in m.items()})
        assert step._cache_size() == 1, impl
        moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), _host(state.params), before)
        assert any(jax.tree_util.tree_leaves(moved)), impl
        results[impl] = metrics
    for impl in ("chunked", "splash"):
        for got, want in zip(results[impl], results["xla"], strict=True):
            for key in ("loss", "kl", "grad_norm", "entropy", "reward/mean"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=f"{impl} {key}")
