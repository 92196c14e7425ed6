"""Sampler: greedy == step-by-step argmax, logprobs == training forward, order/rng, early stop, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sampling, sharding
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params

CONFIG = tiny_model_config()
EOS = 1


@pytest.fixture(scope="module")
def params():
    return tiny_params(CONFIG, seed=3)


def _prompts():
    seqs = [[5, 9, 17, 33, 2], [7, 8, 100], [11, 12, 13, 14], [40]]
    width = 6
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return seqs, tokens, mask


def test_greedy_equals_stepwise_argmax_without_cache(params):
    seqs, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(0),
        num_samples=1,
        max_new_tokens=7,
        temperature=0.0,
        eos_id=EOS,
    )
    for i, seq in enumerate(seqs):
        ids = list(seq)
        for _ in range(7):
            logits = models.forward(CONFIG, params, jnp.asarray([ids]))
            ids.append(int(jnp.argmax(logits[0, -1])))
            if ids[-1] == EOS:
                break
        generated = ids[len(seq) :]
        assert np.asarray(out.tokens[i, : len(generated)]).tolist() == generated
        assert int(out.lengths[i]) == len(generated)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_training_forward(params, temperature):
    _, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(1),
        num_samples=3,
        max_new_tokens=8,
        temperature=temperature,
        eos_id=EOS,
    )
    recomputed = sampling.rollout_logprobs(CONFIG, params, out, temperature=temperature)
    diff = float(jnp.max(jnp.abs(recomputed - out.logprobs)))
    print(f"max |sampler - trainer| logprob at T={temperature}: {diff:.2e}")
    assert diff <= 1e-5
    assert float(jnp.sum(out.mask)) > 0


def test_group_layout_rng_and_prompt_order(params):
    _, tokens, mask = _prompts()
    kw = dict(num_samples=4, max_new_tokens=6, temperature=1.0, eos_id=EOS)
    out = sampling.generate(CONFIG, params, tokens, mask, jax.random.key(7), **kw)
    assert out.tokens.shape == (16, 6)
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens), np.repeat(tokens, 4, axis=0))
    np.testing.assert_array_equal(np.asarray(out.prompt_mask), np.repeat(mask, 4, axis=0))
    group = np.asarray(out.tokens[4:8])
    assert len({tuple(r) for r in group}) > 1, "the G samples of a prompt should differ at temperature 1"
    again = sampling.generate(CONFIG, params, tokens, mask, jax.random.key(7), **kw)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    perm = np.array([2, 0, 3, 1])
    permuted = sampling.generate(CONFIG, params, tokens[perm], mask[perm], jax.random.key(7), **kw)
    rows = np.concatenate([np.arange(4) + 4 * p for p in perm])
    np.testing.assert_array_equal(np.asarray(permuted.tokens), np.asarray(out.tokens)[rows])
    np.testing.assert_allclose(np.asarray(permuted.logprobs), np.asarray(out.logprobs)[rows], atol=1e-6)


def test_early_stop_ends_the_loop(params):
    _, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(0),
        num_samples=2,
        max_new_tokens=12,
        temperature=0.0,
        eos_id=EOS,
    )
    first = np.asarray(out.tokens[:, 0])
    # Make every sequence's first greedy token a stop id: the loop must end after one step.
    stopped = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(0),
        num_samples=2,
        max_new_tokens=12,
        temperature=0.0,
        eos_id=EOS,
        stop_ids=tuple(set(first.tolist())),
    )
    assert int(stopped.num_steps) == 1
    assert np.asarray(stopped.lengths).tolist() == [1] * 8
    assert not np.asarray(stopped.truncated).any()
    assert int(out.num_steps) == 12 and np.asarray(out.truncated).all()
    # min_new_tokens forbids the early stop.
    held = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(0),
        num_samples=2,
        max_new_tokens=12,
        temperature=0.0,
        eos_id=EOS,
        stop_ids=tuple(set(first.tolist())),
        min_new_tokens=3,
    )
    assert (np.asarray(held.lengths) >= 3).all()


def test_mask_covers_tokens_up_to_and_including_stop(params):
    _, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(4),
        num_samples=8,
        max_new_tokens=10,
        temperature=1.5,
        eos_id=EOS,
        stop_ids=(5, 6, 7, 8, 9, 10),
    )
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    stops = {1, 5, 6, 7, 8, 9, 10}
    for row_tokens, row_mask, length, trunc in zip(
        toks, m, np.asarray(out.lengths), np.asarray(out.truncated)
    ):
        assert row_mask[:length].all() and not row_mask[length:].any()
        if trunc:
            assert not (set(row_tokens[:length].tolist()) & stops)
        else:
            assert row_tokens[length - 1] in stops
            assert not (set(row_tokens[: length - 1].tolist()) & stops)
            assert (row_tokens[length:] == 0).all()
    assert (~np.asarray(out.truncated)).any()


def test_compiles_once_and_sharded_equals_single_device(params):
    _, tokens, mask = _prompts()
    kw = dict(num_samples=2, max_new_tokens=5, temperature=1.0, eos_id=EOS)
    expected = sampling.generate(CONFIG, params, tokens, mask, jax.random.key(2), **kw)
    before = sampling._generate._cache_size()
    sampling.generate(CONFIG, params, tokens, mask, jax.random.key(3), **kw)
    assert sampling._generate._cache_size() == before

    mesh = mesh_2x2x2()
    sharded_params = jax.device_put(params, sharding.model_param_shardings(mesh, CONFIG))
    placed = sharding.shard_batch({"t": tokens, "m": mask}, mesh)  # 4 prompts over data x fsdp = 4
    assert len(placed["t"].sharding.device_set) == 8
    got = sampling.generate(
        CONFIG, sharded_params, placed["t"], placed["m"], jax.random.key(2), mesh=mesh, **kw
    )
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expected.logprobs), atol=1e-5)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp")


def test_top_k_and_top_p_respect_the_allowed_set():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)
    sample = lambda lg: jax.vmap(jax.random.categorical)(keys, lg)
    top2 = np.asarray(sample(sampling.truncate_logits(logits, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample(sampling.truncate_logits(logits, top_p=0.8)))
    assert set(nucleus.tolist()) == {0, 1, 2}  # 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.15
    assert abs(np.mean(nucleus == 0) - 0.5 / 0.9) < 0.04
    both = np.asarray(sample(sampling.truncate_logits(logits, top_k=3, top_p=0.6)))
    assert set(both.tolist()) == {0, 1}


def test_top_k_sampler_only_emits_top_k_tokens(params):
    _, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(9),
        num_samples=4,
        max_new_tokens=4,
        temperature=1.0,
        top_k=3,
        eos_id=EOS,
    )
    full = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    fmask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    logits = models.forward(CONFIG, params, full, attention_mask=fmask)[:, tokens.shape[1] - 1 : -1]
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for r in range(toks.shape[0]):
        for t in range(toks.shape[1]):
            if m[r, t]:
                assert toks[r, t] in top3[r, t]
    assert (np.asarray(out.sampling_logprobs)[m > 0] >= np.asarray(out.logprobs)[m > 0] - 1e-6).all()


def test_raw_and_typed_keys_give_identical_rollouts(params):
    _, tokens, mask = _prompts()
    kw = dict(num_samples=3, max_new_tokens=5, temperature=1.0, top_k=20, eos_id=EOS)
    raw = sampling.generate(CONFIG, params, tokens, mask, jax.random.PRNGKey(42), **kw)
    wrapped = sampling.generate(
        CONFIG, params, tokens, mask, jax.random.wrap_key_data(jax.random.PRNGKey(42)), **kw
    )
    typed = sampling.generate(CONFIG, params, tokens, mask, jax.random.key(42), **kw)
    for other in (wrapped, typed):
        np.testing.assert_array_equal(np.asarray(raw.tokens), np.asarray(other.tokens))
        np.testing.assert_array_equal(np.asarray(raw.logprobs), np.asarray(other.logprobs))
        np.testing.assert_array_equal(np.asarray(raw.sampling_logprobs), np.asarray(other.sampling_logprobs))


@pytest.mark.parametrize(
    "make_rng, error, message",
    [
        (lambda: 0, TypeError, r"generate\(rng\) must be a PRNG key .*, got int 0$"),
        (lambda: np.zeros(2, np.float32), TypeError, r"got an array of dtype float32 and shape \(2,\)$"),
        (lambda: np.zeros((3, 2), np.uint32), ValueError, r"uint32 of shape \(2,\), got shape \(3, 2\)$"),
        (lambda: jax.random.split(jax.random.key(0), 4), ValueError, r"got a key array of shape \(4,\)$"),
    ],
)
def test_a_bad_rng_gets_one_line_naming_the_argument(params, make_rng, error, message):
    _, tokens, mask = _prompts()
    with pytest.raises(error, match=message) as info:
        sampling.generate(
            CONFIG, params, tokens, mask, make_rng(), num_samples=1, max_new_tokens=2, eos_id=EOS
        )
    assert "\n" not in str(info.value)
