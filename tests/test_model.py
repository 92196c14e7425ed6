"""Model: sharded == single device, KV-cache decode == full forward, left padding, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax import models, sharding
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params


@pytest.fixture(scope="module")
def config():
    return tiny_model_config()


@pytest.fixture(scope="module")
def params(config):
    return tiny_params(config)


def _tokens(batch=4, length=9, seed=1, vocab=128):
    return jax.random.randint(jax.random.key(seed), (batch, length), 3, vocab)


def test_forward_shape_and_dtype(config, params):
    logits = models.forward(config, params, _tokens())
    assert logits.shape == (4, 9, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_sharded_forward_matches_single_device(config, params):
    mesh = mesh_2x2x2()
    sharded = models.init_sharded_params(config, jax.random.key(0), mesh)
    # Really sharded: q [L, D, H, Dh] maps embed->fsdp and heads->tensor.
    assert sharded["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded["embed"].sharding.spec == P("tensor", "fsdp")
    assert len(sharded["layers"]["q"].addressable_shards) == 8
    assert sharded["layers"]["q"].addressable_shards[0].data.shape == (2, 16, 2, 8)
    tokens = _tokens(batch=8)
    mask = jnp.ones_like(tokens).at[:2, :3].set(0)
    expected = models.forward(config, params, tokens, attention_mask=mask)
    placed = sharding.shard_batch({"t": np.asarray(tokens), "m": np.asarray(mask)}, mesh)
    got = jax.jit(lambda p, t, m: models.forward(config, p, t, attention_mask=m))(
        sharded, placed["t"], placed["m"]
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_left_padding_matches_unpadded(config, params):
    seqs = [[5, 9, 17, 33, 2], [7, 8, 100], [11]]
    width = 6
    tokens = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    padded = models.forward(config, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    for i, s in enumerate(seqs):
        alone = models.forward(config, params, jnp.asarray([s]))
        np.testing.assert_allclose(np.asarray(padded[i, width - len(s) :]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False}, {"remat": "full"}])
def test_kv_cache_decode_matches_forward(overrides):
    config = tiny_model_config(**overrides)
    params = tiny_params(config)
    tokens = np.asarray(_tokens(batch=2, length=10))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # second row left-padded: 3 pads, prompt of 4 real tokens
    full = models.forward(config, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    prompt_len, total = 7, tokens.shape[1]
    cache = models.init_cache(config, 2, total)
    key_mask = np.zeros((2, total), np.int32)
    key_mask[:, :prompt_len] = mask[:, :prompt_len]
    positions = models.positions_from_mask(jnp.asarray(mask))
    logits, cache = models.forward_with_cache(
        config,
        params,
        jnp.asarray(tokens[:, :prompt_len]),
        positions[:, :prompt_len],
        cache,
        0,
        jnp.asarray(key_mask),
    )
    np.testing.assert_allclose(
        np.asarray(logits)[mask[:, :prompt_len] > 0],
        np.asarray(full[:, :prompt_len])[mask[:, :prompt_len] > 0],
        atol=1e-5,
    )
    last, _ = models.forward_with_cache(
        config,
        params,
        jnp.asarray(tokens[:, :prompt_len]),
        positions[:, :prompt_len],
        models.init_cache(config, 2, total),
        0,
        jnp.asarray(key_mask),
        last_only=True,
    )  # the sampler's prefill: only the last position goes through the vocabulary projection
    assert last.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, prompt_len - 1]), atol=1e-5)
    for t in range(prompt_len, total):
        key_mask[:, t] = 1
        step_logits, cache = models.forward_with_cache(
            config,
            params,
            jnp.asarray(tokens[:, t : t + 1]),
            positions[:, t : t + 1],
            cache,
            t,
            jnp.asarray(key_mask),
        )
        np.testing.assert_allclose(np.asarray(step_logits[:, 0]), np.asarray(full[:, t]), atol=1e-5)


def test_token_logprobs_chunked_matches_full_softmax(config, params):
    tokens = _tokens(batch=3, length=11)
    full = jax.nn.log_softmax(models.forward(config, params, tokens) / 0.7, axis=-1)
    expected = jnp.take_along_axis(full[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    got, entropy = models.token_logprobs(
        config, params, tokens, temperature=0.7, chunk_size=4, with_entropy=True
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    expected_entropy = -jnp.sum(jnp.exp(full) * full, axis=-1)[:, :-1]
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(expected_entropy), atol=1e-5)


def _matmul_operand_dtypes(config, params, tokens) -> set:
    """The dtypes of both operands of every dot_general in `forward`'s program, scan/remat bodies included."""

    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from eqns(sub)

    closed = jax.make_jaxpr(lambda p, t: models.forward(config, p, t))(params, tokens)
    return {
        v.aval.dtype for eqn in eqns(closed.jaxpr) if eqn.primitive.name == "dot_general" for v in eqn.invars
    }


def test_bfloat16_compute_runs_close_to_float32(params):
    bf16, fp32 = tiny_model_config(dtype="bfloat16"), tiny_model_config()
    tokens = _tokens()
    # Really computed in bf16 (from float32 params): hidden states, and both operands of every matmul.
    assert models.forward_hidden(bf16, params, tokens).dtype == jnp.bfloat16
    assert _matmul_operand_dtypes(bf16, params, tokens) == {jnp.dtype(jnp.bfloat16)}
    assert _matmul_operand_dtypes(fp32, params, tokens) == {jnp.dtype(jnp.float32)}
    logits = models.forward(bf16, params, tokens)
    reference = models.forward(fp32, params, tokens)
    assert logits.dtype == jnp.float32  # the contract: float32 logits whatever the compute dtype
    # bf16 rounding (8 mantissa bits) shows, but stays small next to logits of size ~0.5.
    assert 1e-4 < float(jnp.max(jnp.abs(logits - reference))) < 0.05
    # param_dtype stores the weights themselves in bf16.
    stored = tiny_params(tiny_model_config(param_dtype="bfloat16"))
    assert {x.dtype for x in jax.tree_util.tree_leaves(stored)} == {jnp.dtype(jnp.bfloat16)}


def test_tied_embeddings_and_qkv_bias_param_tree():
    config = tiny_model_config(tie_embeddings=True, qkv_bias=True)
    params = tiny_params(config)
    assert "lm_head" not in params and "q_bias" in params["layers"]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes == models.param_shapes(config)
    assert models.forward(config, params, _tokens()).shape == (4, 9, 128)


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        sharding.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        sharding.make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="unknown axis name"):
        sharding.make_mesh({"pipeline": 2})
    mesh = sharding.make_mesh((-1, 1, 1))
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)


def test_indivisible_axis_is_replicated_not_an_error():
    mesh = sharding.make_mesh((1, 1, 8))
    spec = sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 32, 2, 8), mesh)
    assert spec == P(None, "fsdp", None, None)  # fsdp has size 1; tensor=8 does not divide 2 kv heads
    assert isinstance(NamedSharding(mesh, spec), NamedSharding)


def test_model_config_errors():
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        tiny_model_config(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        tiny_model_config(remat="sometimes")
    with pytest.raises(ValueError, match="unsupported rope_type"):
        tiny_model_config(rope_scaling=(("rope_type", "yarn"), ("factor", 2.0)))
