"""Sampler: greedy == step-by-step argmax, logprobs == training forward, order/rng, early stop, sharding."""

import functools

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
    # One compiled forward over a fixed width: right padding never reaches earlier positions (causal).
    width = max(len(seq) for seq in seqs) + 7
    forward = jax.jit(lambda params, ids: models.forward(CONFIG, params, ids))
    for i, seq in enumerate(seqs):
        ids = list(seq)
        for _ in range(7):
            logits = forward(params, jnp.asarray([ids + [0] * (width - len(ids))]))
            ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
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


def test_min_new_tokens_logprobs_are_the_policy_and_sampling_logprobs_the_masked_draw(params):
    """With stop tokens masked for the first `min_new_tokens` steps, `logprobs` stay the policy's
    full-softmax logprobs (what the trainer computes: π_old) and `sampling_logprobs` are those of the
    masked distribution sampled from (π_sampler), larger by exactly the stop tokens' lost mass."""
    _, tokens, mask = _prompts()
    stops, temperature = (EOS, 5, 6), 0.8
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(3),
        num_samples=3,
        max_new_tokens=8,
        temperature=temperature,
        eos_id=EOS,
        stop_ids=stops,
        min_new_tokens=5,
    )
    valid = np.asarray(out.mask) > 0
    recomputed = np.asarray(sampling.rollout_logprobs(CONFIG, params, out, temperature=temperature))
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], recomputed[valid], atol=1e-5)
    # π_sampler = π / (1 − stop mass) on the masked steps, = π after them (no top-p/top-k here).
    logits = models.forward(
        CONFIG,
        params,
        jnp.concatenate([out.prompt_tokens, out.tokens], axis=1),
        attention_mask=jnp.concatenate([out.prompt_mask, out.mask], axis=1),
    )
    P = tokens.shape[1]
    logp = jax.nn.log_softmax(np.asarray(logits)[:, P - 1 : -1] / temperature, axis=-1)
    stop_mass = np.exp(np.asarray(logp)[..., list(stops)]).sum(-1)
    expected = np.asarray(out.logprobs) - np.log1p(-stop_mass) * (np.arange(8) < 5)
    np.testing.assert_allclose(np.asarray(out.sampling_logprobs)[valid], expected[valid], atol=1e-5)
    assert (np.asarray(out.sampling_logprobs) - np.asarray(out.logprobs))[:, :5][valid[:, :5]].min() > 1e-4


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
    sharded_params = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    placed = sharding.shard_batch({"t": tokens, "m": mask}, mesh)  # 4 prompts over data x fsdp = 4
    assert len(placed["t"].sharding.device_set) == 8
    got = sampling.generate(
        CONFIG, sharded_params, placed["t"], placed["m"], jax.random.key(2), mesh=mesh, **kw
    )
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expected.logprobs), atol=1e-5)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp")


def test_kv_cache_is_split_over_tensor_as_well_as_rows():
    """On a (1, 2, 4) mesh, 4 KV heads: the sampler's temporaries hold about 1/8 of the cache per device
    (rows over fsdp = 2, KV heads over tensor = 4); with the rows split alone they held over half."""
    config = models.ModelConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4
    )
    mesh = sharding.make_mesh((1, 2, 4), devices=jax.devices()[:8])
    params = jax.device_put(tiny_params(config, seed=0), models.model_param_shardings(mesh, config))
    B, P, L, G = 4, 8, 120, 4
    tokens = sharding.shard_batch({"t": np.ones((B, P), np.int32)}, mesh)["t"]
    static = dict(temperature=1.0, top_p=1.0, top_k=0, stop_ids=(1,), min_new_tokens=0, pad_id=0)
    lowered = sampling._generate.lower(
        config,
        params,
        tokens,
        tokens,
        jax.random.key(0),
        mesh=mesh,
        num_samples=G,
        max_new_tokens=L,
        **static,
    )
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    cache = 2 * config.num_layers * B * G * (P + L) * config.num_kv_heads * config.resolved_head_dim * 4
    assert temp < 0.35 * cache, (temp, cache)


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


def _nucleus_by_sorting(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The sorted-cumsum nucleus (Holtzman et al.): keep a token iff the mass of the tokens sorted before
    it is below top_p, ties with a kept token kept. float64 numpy, one row at a time."""
    keep = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits.astype(np.float64)):
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        order = np.argsort(-values, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        threshold = values[order][mass_before < top_p].min()
        keep[row] = values >= threshold
    return keep


def test_top_p_bisection_equals_the_sorted_nucleus():
    """`truncate_logits` finds the nucleus by bisection over float order keys, not by sorting: the same
    set as sorting, on random rows, rows with ties (rounded logits, -0.0 next to 0.0) and top-k first."""
    rng = np.random.default_rng(0)
    for vocab in (5, 64, 257):
        for top_p in (0.3, 0.9, 0.999):
            truncate = jax.jit(functools.partial(sampling.truncate_logits, top_p=top_p))
            for scale, tied in ((0.1, True), (1.0, False), (1.0, True), (8.0, False)):
                logits = (rng.standard_normal((6, vocab)) * scale).astype(np.float32)
                logits = np.round(logits) if tied else logits
                got = np.asarray(truncate(jnp.asarray(logits))) > -1e29
                expected = _nucleus_by_sorting(logits, top_p)
                np.testing.assert_array_equal(got, expected, err_msg=f"V={vocab} top_p={top_p} {scale}")
    logits = rng.standard_normal((4, 50)).astype(np.float32)  # no ties: top-k keeps exactly k
    top3 = np.asarray(sampling.truncate_logits(jnp.asarray(logits), top_k=3, top_p=0.999)) > -1e29
    np.testing.assert_array_equal(top3, _nucleus_by_sorting(np.where(top3, logits, -1e30), 0.999))
    assert (top3.sum(axis=-1) == 3).all()


def _completion_logits(params, out):
    """Logits [N, L, V] of the training forward at each completion position of a Rollout."""
    full = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    fmask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    return models.forward(CONFIG, params, full, attention_mask=fmask)[:, out.prompt_tokens.shape[1] - 1 : -1]


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
    logits = _completion_logits(params, out)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for r in range(toks.shape[0]):
        for t in range(toks.shape[1]):
            if m[r, t]:
                assert toks[r, t] in top3[r, t]
    assert (np.asarray(out.sampling_logprobs)[m > 0] >= np.asarray(out.logprobs)[m > 0] - 1e-6).all()


# ------------------------------------------------------------------------------------------------
# The token choice: inverse CDF of the (truncated) softmax
# ------------------------------------------------------------------------------------------------


def _expected_probs(logits, temperature, top_k=0, top_p=1.0):
    """(full softmax, the truncated renormalised distribution the sampler must draw from), computed
    independently in NumPy (float64). As in Hugging Face's warpers, top-k comes first and the nucleus
    is taken over the renormalised top-k distribution."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    truncated = probs.copy()
    if top_k:
        truncated[scaled < np.sort(scaled)[::-1][top_k - 1]] = 0.0
        truncated /= truncated.sum()
    if top_p < 1.0:
        order = np.argsort(-truncated, kind="stable")
        mass_before = np.cumsum(truncated[order]) - truncated[order]
        truncated[order[mass_before >= top_p]] = 0.0
        truncated /= truncated.sum()
    return probs, truncated


def _chi_square_p_value(counts, expected_probs):
    """Pearson's chi-square goodness of fit over the tokens of non-zero expected probability."""
    from scipy import stats

    support = expected_probs > 0
    expected = expected_probs[support] * counts.sum()
    statistic = float(np.sum((counts[support] - expected) ** 2 / expected))
    return float(stats.chi2.sf(statistic, df=int(support.sum()) - 1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 12, 1.0), (1.0, 0, 0.8), (0.8, 20, 0.9)],
)
def test_choose_tokens_frequencies_match_the_softmax(temperature, top_k, top_p):
    """40,000 draws (8,000 rows x 5 steps) over V = 50 (blocks of 8, the last one padded): the token
    frequencies fit the (truncated) softmax at p > 0.001, tokens outside the truncation never appear,
    and logprob / sampling_logprob are the log-probabilities of the drawn token."""
    vocab, rows, steps = 50, 8000, 5
    logits_row = 1.5 * jax.random.normal(jax.random.key(11), (vocab,), jnp.float32)
    logits = jnp.broadcast_to(logits_row, (rows, vocab))
    keys = jax.random.split(jax.random.key(12), rows)
    full, expected = _expected_probs(logits_row, temperature, top_k, top_p)
    choose = jax.jit(
        lambda lg, k, s: sampling.choose_tokens(lg, k, s, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    counts = np.zeros(vocab, np.int64)
    for step in range(steps):
        token, logp, sampling_logp = (np.asarray(x) for x in choose(logits, keys, jnp.asarray(step)))
        counts += np.bincount(token, minlength=vocab)
        np.testing.assert_allclose(logp, np.log(full[token]), atol=1e-5)
        np.testing.assert_allclose(sampling_logp, np.log(expected[token]), atol=1e-5)
    assert counts[expected == 0].sum() == 0
    p_value = _chi_square_p_value(counts, expected)
    print(f"T={temperature} top_k={top_k} top_p={top_p}: chi-square p = {p_value:.3f}")
    assert p_value > 1e-3
    if top_k or top_p < 1.0:
        assert (expected == 0).any()  # the truncation removed something


def test_choose_tokens_draws_afresh_each_step_and_row():
    """Per-row streams: the same row at consecutive steps, and different rows at one step, are
    independent draws (agreement ~ sum p^2 as for independent samples), and a row's draw depends only
    on its own key and the step."""
    vocab, rows = 16, 4000
    logits = jnp.zeros((rows, vocab))
    keys = jax.random.split(jax.random.key(0), rows)
    first = np.asarray(sampling.choose_tokens(logits, keys, 0)[0])
    second = np.asarray(sampling.choose_tokens(logits, keys, 1)[0])
    assert abs(np.mean(first == second) - 1 / vocab) < 0.02
    assert abs(np.mean(first[:-1] == first[1:]) - 1 / vocab) < 0.02
    reordered = np.asarray(sampling.choose_tokens(logits[::-1], keys[::-1], 0)[0])
    np.testing.assert_array_equal(reordered[::-1], first)


def test_min_new_tokens_forbids_stop_tokens_only_before_the_minimum():
    vocab, rows = 8, 3000
    logits = jnp.zeros((rows, vocab)).at[:, 3].set(2.0)  # the stop token is the likeliest
    keys = jax.random.split(jax.random.key(1), rows)
    kw = dict(temperature=1.0, stop_ids=(3, 5), min_new_tokens=2)
    early = np.asarray(sampling.choose_tokens(logits, keys, 1, **kw)[0])
    assert not np.isin(early, [3, 5]).any()
    assert _chi_square_p_value(np.bincount(early, minlength=vocab), np.r_[1, 1, 1, 0, 1, 0, 1, 1] / 6) > 1e-3
    late = np.asarray(sampling.choose_tokens(logits, keys, 2, **kw)[0])
    assert abs(np.mean(late == 3) - np.exp(2) / (np.exp(2) + 7)) < 0.03


def test_inverse_cdf_never_returns_a_zero_probability_token():
    """Extreme uniforms (0 and the largest float32 below 1) on rows with zeros at the ends, inside and
    across block boundaries (V = 37: blocks of 8, the last padded) land on a positive-probability token;
    a uniform's position maps to the token whose CDF interval holds it."""
    vocab = 37
    rows = np.zeros((5, vocab), np.float32)
    rows[0, [5, 6]] = [0.25, 0.75]  # zeros before and after
    rows[1, 36] = 1.0  # only the last token, in the padded block
    rows[2, 0] = 1.0  # only the first token
    rows[3, 8:16] = 1.0  # one whole block, unnormalised
    rows[4] = 1.0
    probs = jnp.asarray(np.repeat(rows, 3, axis=0))
    top = np.nextafter(np.float32(1), np.float32(0))
    u = np.tile(np.array([[0.0, 0.0], [top, top], [0.5, 0.5]], np.float32), (5, 1))
    token = np.asarray(sampling.inverse_cdf_sample(probs, jnp.asarray(u)))
    assert (np.asarray(probs)[np.arange(15), token] > 0).all()
    assert token.reshape(5, 3).tolist() == [[5, 6, 6], [36, 36, 36], [0, 0, 0], [8, 15, 12], [0, 36, 20]]


def test_top_p_acts_through_generate(params):
    """Every generated token lies in the nucleus of the training forward's distribution at that position
    (top_p = 0.5 of a near-uniform tiny model excludes about half the vocabulary), and sampling_logprobs
    are the renormalised nucleus log-probabilities."""
    _, tokens, mask = _prompts()
    out = sampling.generate(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(5),
        num_samples=8,
        max_new_tokens=6,
        temperature=0.9,
        top_p=0.5,
        eos_id=EOS,
    )
    logits = _completion_logits(params, out)
    nucleus_logp = np.asarray(jax.nn.log_softmax(sampling.truncate_logits(logits / 0.9, top_p=0.5), axis=-1))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask) > 0
    chosen = np.take_along_axis(nucleus_logp, toks[..., None], axis=-1)[..., 0]
    excluded = np.mean(nucleus_logp[m] < -1e20)
    print(f"share of the vocabulary outside the nucleus: {excluded:.2f}")
    assert excluded > 0.3
    assert (chosen[m] > -1e20).all(), "a token outside the nucleus was sampled"
    np.testing.assert_allclose(np.asarray(out.sampling_logprobs)[m], chosen[m], atol=1e-4)


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
