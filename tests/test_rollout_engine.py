"""Rollout engine (grpo_jax.rollout): the static sampler's Rollout exactly, page accounting, routing."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from grpo_jax import models, sampling, sharding
from grpo_jax.rollout import engine, paged_cache
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import setup
from grpo_jax.training.stages.rollout import RolloutStage

CONFIG = tiny_model_config()
EOS = 1
# Stop tokens the tiny random model draws early on some rows and never on others (checked below).
STOPS = (3, 7, 9, 20, 31)
PAGE = 4
LENGTH = 12


@pytest.fixture(scope="module")
def params():
    return tiny_params(CONFIG, seed=3)


def _prompts():
    """Left-padded prompts of lengths 5, 3, 4, 1 in width 6 (not a multiple of the page size)."""
    seqs = [[5, 9, 17, 33, 2], [7, 8, 100], [11, 12, 13, 14], [40]]
    tokens = np.zeros((len(seqs), 6), np.int32)
    mask = np.zeros((len(seqs), 6), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, 6 - len(s) :] = s
        mask[i, 6 - len(s) :] = 1
    return tokens, mask


SETTINGS = {
    "greedy_g1": dict(num_samples=1, temperature=0.0),
    "sampled_g4": dict(num_samples=4, temperature=1.0),
    "top_p_top_k_g4": dict(num_samples=4, temperature=0.8, top_p=0.9, top_k=20, min_new_tokens=2),
}


@pytest.fixture(scope="module")
def static_rollouts(params):
    """The static sampler's rollout of each setting (the reference), computed once."""
    tokens, mask = _prompts()
    return {
        name: sampling.generate(
            CONFIG,
            params,
            tokens,
            mask,
            jax.random.key(5),
            max_new_tokens=LENGTH,
            eos_id=EOS,
            stop_ids=STOPS,
            **kw,
        )
        for name, kw in SETTINGS.items()
    }


def _assert_same_rollout(out, ref):
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_array_equal(np.asarray(out.truncated), np.asarray(ref.truncated))
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens), np.asarray(ref.prompt_tokens))
    np.testing.assert_array_equal(np.asarray(out.prompt_mask), np.asarray(ref.prompt_mask))
    for name in ("logprobs", "sampling_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), atol=1e-5)
    assert int(out.num_steps) == int(ref.num_steps)


def _own_pages_max(prompt_len):
    """A slot's worst case: its prompt's partly filled last page (copy-on-write, up to PAGE - 1 prompt
    tokens) plus its L - 1 fed tokens."""
    return -(-(min(PAGE - 1, prompt_len) + LENGTH - 1) // PAGE)


def _assert_pages_accounted(stats, *, batch, prompt_len, slots):
    stats = jax.tree_util.tree_map(int, stats)
    prompt_pages = batch * -(-prompt_len // PAGE)
    assert stats.prompt_pages == prompt_pages
    assert stats.slots == slots
    assert stats.num_pages == prompt_pages + slots * _own_pages_max(prompt_len)
    assert stats.page_errors == 0, "a page had no owner or two (pool, live sample, live prompt)"
    assert stats.pool_underflows == 0
    assert stats.free_pages == stats.num_pages, "pages leaked: the pool is not full when the loop ends"
    assert prompt_pages < stats.peak_pages_in_use <= stats.num_pages
    return stats


@pytest.mark.parametrize(
    "setting, num_slots",
    [
        ("greedy_g1", 3),  # S < N = 4
        ("sampled_g4", None),  # S = N = 16
        ("sampled_g4", 5),
        ("top_p_top_k_g4", 1),  # one slot: every item decoded after the previous one
        # top-p/top-k with S = 8 < N on a 2x2x2 mesh: test_engine_on_a_2x2x2_mesh_...
    ],
)
def test_engine_equals_the_static_sampler(params, static_rollouts, setting, num_slots):
    tokens, mask = _prompts()
    ref = static_rollouts[setting]
    out, stats = engine.generate_with_stats(
        CONFIG,
        params,
        tokens,
        mask,
        jax.random.key(5),
        max_new_tokens=LENGTH,
        eos_id=EOS,
        stop_ids=STOPS,
        num_slots=num_slots,
        page_size=PAGE,
        check_pages=True,
        **SETTINGS[setting],
    )
    _assert_same_rollout(out, ref)
    n = tokens.shape[0] * SETTINGS[setting]["num_samples"]
    slots = num_slots or n
    stats = _assert_pages_accounted(stats, batch=tokens.shape[0], prompt_len=tokens.shape[1], slots=slots)
    lengths = np.asarray(ref.lengths)
    # A row of length l > 1 fed l - 1 tokens after its prompt's r = len % PAGE tokens on the prompt's
    # partly filled page, which it copied: ceil((r + l - 1) / PAGE) pages of its own (none if l = 1).
    tail = np.repeat(mask.sum(axis=1) % PAGE, SETTINGS[setting]["num_samples"])
    assert stats.pages_taken == np.sum(np.where(lengths > 1, -(-(tail + lengths - 1) // PAGE), 0))
    # Token 0 comes from the prefill; every later token is one decode step of its slot, and a slot freed
    # in a step is refilled before the next one (no idle slot while rows wait).
    if slots < n:
        assert stats.iterations >= (lengths - 1).sum() / slots
    else:
        assert stats.iterations == lengths.max() - 1
    if setting == "sampled_g4" and num_slots is None:  # the prompts' pages are held once, not per sample
        assert (stats.prompt_pages, stats.num_pages) == (4 * 2, 4 * 2 + 16 * 4)  # ceil(6/4), ceil(14/4)
    if setting == "top_p_top_k_g4" and num_slots == 1:  # pages freed by a finished row are reused
        assert stats.pages_taken > stats.num_pages - stats.prompt_pages


def test_one_compilation_per_config(params):
    """Another key and other prompts of the same shapes reuse the program the test above compiled."""
    tokens, mask = _prompts()
    before = engine._generate._cache_size()
    out = engine.generate(
        CONFIG,
        params,
        tokens[::-1].copy(),
        mask[::-1].copy(),
        jax.random.key(11),
        max_new_tokens=LENGTH,
        eos_id=EOS,
        stop_ids=STOPS,
        num_slots=5,
        page_size=PAGE,
        check_pages=True,
        **SETTINGS["sampled_g4"],
    )
    assert int(out.mask.sum()) > 0
    assert engine._generate._cache_size() == before


def test_the_reference_exercises_early_and_late_stops(static_rollouts):
    """The equality above covers rows stopping at different steps and rows running to the budget."""
    for name in ("sampled_g4", "top_p_top_k_g4"):
        ref = static_rollouts[name]
        lengths, truncated = np.asarray(ref.lengths), np.asarray(ref.truncated)
        stopped = lengths[~truncated]
        assert truncated.any() and len(set(stopped.tolist())) >= 2, (name, lengths, truncated)
    assert np.asarray(static_rollouts["top_p_top_k_g4"].lengths).min() >= 2  # min_new_tokens held


def test_engine_on_a_2x2x2_mesh_equals_the_single_device_static_sampler(params, static_rollouts):
    mesh = mesh_2x2x2()
    tokens, mask = _prompts()
    placed = sharding.shard_batch({"t": tokens, "m": mask}, mesh)
    sharded_params = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    out, stats = engine.generate_with_stats(
        CONFIG,
        sharded_params,
        placed["t"],
        placed["m"],
        jax.random.key(5),
        max_new_tokens=LENGTH,
        eos_id=EOS,
        stop_ids=STOPS,
        num_slots=8,  # S < N, split over data x fsdp = 4
        page_size=PAGE,
        check_pages=True,
        mesh=mesh,
        **SETTINGS["top_p_top_k_g4"],
    )
    _assert_same_rollout(out, static_rollouts["top_p_top_k_g4"])
    _assert_pages_accounted(stats, batch=4, prompt_len=6, slots=8)
    assert out.tokens.sharding.spec[0] == sharding.BATCH_AXES


def test_prompts_that_do_not_split_over_the_data_shards_run_as_one_engine(params, static_rollouts):
    """3 prompts on 4 data shards: one engine (its pool on every row shard), the same rows as ever (a
    row's tokens depend on its prompt and sample index, not on the batch: rows 0..11 of the 4 prompts)."""
    mesh = mesh_2x2x2()
    tokens, mask = _prompts()
    sharded_params = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    out, stats = engine.generate_with_stats(
        CONFIG,
        sharded_params,
        tokens[:3],
        mask[:3],
        jax.random.key(5),
        max_new_tokens=LENGTH,
        eos_id=EOS,
        stop_ids=STOPS,
        num_slots=5,
        page_size=PAGE,
        check_pages=True,
        mesh=mesh,
        **SETTINGS["sampled_g4"],
    )
    ref = static_rollouts["sampled_g4"]
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name))[:12])
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs)[:12], atol=1e-5)
    _assert_pages_accounted(stats, batch=3, prompt_len=6, slots=5)


def test_on_a_data_parallel_mesh_each_data_shard_holds_its_own_block_of_pages(params):
    """On the 2x2x2 mesh (4 data shards) the engine runs 4 sub-engines, each with its prompts' pages and
    its slots' pages on its own devices: the compiled program's per-device temporaries are less than
    half the pool, which a pool replicated over the batch axes (KV heads over `tensor` only) needs on
    every device by itself (measured: 0.72 MB per device split, 1.36 MB replicated, pool 2.1 MB)."""
    mesh, length = mesh_2x2x2(), 1024  # a long budget: the pool dominates the program's memory
    tokens, mask = _prompts()
    placed = sharding.shard_batch({"t": tokens, "m": mask}, mesh)
    sharded_params = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    run = jax.jit(
        lambda p, t, m: engine.generate_with_stats(
            CONFIG,
            p,
            t,
            m,
            jax.random.key(5),
            num_samples=4,
            max_new_tokens=length,
            eos_id=EOS,
            num_slots=8,
            page_size=PAGE,
            mesh=mesh,
        )
    )
    memory = run.lower(sharded_params, placed["t"], placed["m"]).compile().memory_analysis()
    pages = 4 * -(-6 // PAGE) + 8 * -(-(length - 1) // PAGE) + 1  # prompts + slots' worst case + scratch
    pool_bytes = 2 * CONFIG.num_layers * pages * PAGE * CONFIG.num_kv_heads * CONFIG.resolved_head_dim * 4
    assert memory.temp_size_in_bytes < pool_bytes / 2, (memory.temp_size_in_bytes, pool_bytes)


def test_page_pool_pop_push_and_the_owner_count():
    pop, push, holders = (
        jax.jit(f) for f in (paged_cache.pop_pages, paged_cache.push_pages, paged_cache.page_holders)
    )
    pool = paged_cache.pool_with_free(6, 2)  # pages 0, 1 in use (say, a prompt's), 2..5 free
    pool, pages = pop(pool, jnp.array([True, False, True]))
    pages = np.asarray(pages)
    assert pages[1] == 6 and set(pages[[0, 2]].tolist()) <= {2, 3, 4, 5} and pages[0] != pages[2]
    assert int(pool.free_count) == 2
    held = jnp.array([0, 1, pages[0], pages[2]])
    counts = holders(pool, held, jnp.ones(4, bool))
    np.testing.assert_array_equal(np.asarray(counts), np.ones(6))
    # The check can fail: a page held twice, or held and free at once, or lost.
    twice = holders(pool, jnp.array([0, 1, pages[0], pages[0]]), jnp.ones(4, bool))
    assert sorted(np.asarray(twice).tolist()) == [0, 1, 1, 1, 1, 2]
    pool = push(pool, jnp.array([pages[2], 0, pages[0]]), jnp.array([True, False, True]))
    assert int(pool.free_count) == 4
    counts = holders(pool, jnp.array([0, 1]), jnp.ones(2, bool))
    np.testing.assert_array_equal(np.asarray(counts), np.ones(6))
    pool, _ = pop(pool, jnp.ones(5, bool))  # one more than the pool holds
    assert int(pool.free_count) == -1


# ------------------------------------------------------------------------------------------------
# config.sampler routes every sampling stage
# ------------------------------------------------------------------------------------------------


def _config(sampler, **engine_fields):
    c = ml_collections.ConfigDict()
    c.sampler = sampler
    c.engine = ml_collections.ConfigDict(dict(num_slots=3, page_size=PAGE, **engine_fields))
    c.max_new_tokens = LENGTH
    return c


def test_sampler_fn_reads_the_switch_and_rejects_bad_settings():
    assert setup.sampler_fn(ml_collections.ConfigDict()) is sampling.generate  # configs of older runs
    assert setup.sampler_fn(_config("static")) is sampling.generate
    fn = setup.sampler_fn(_config("engine"))
    assert fn.func is engine.generate and fn.keywords == {"num_slots": 3, "page_size": PAGE}
    with pytest.raises(ValueError, match="config.sampler must be one of"):
        setup.sampler_fn(_config("dynamic"))
    bad = _config("engine")
    bad.engine.page_size = 0
    with pytest.raises(ValueError, match="config.engine.page_size"):
        setup.sampler_fn(bad)


def test_the_config_switch_routes_a_rollout_stage_through_the_engine(params, monkeypatch):
    """RolloutStage.rollout (grpo, ppo, rejection sampling) samples through the engine when
    config.sampler = "engine" and through the static sampler when "static", with the same settings
    (spies stand in for both; that the two give the same Rollout is tested above)."""
    calls = {"static": [], "engine": []}

    def engine_spy(*args, **kwargs):
        calls["engine"].append(kwargs)
        return "engine rollout", None

    def static_spy(*args, **kwargs):
        calls["static"].append(kwargs)
        return "static rollout"

    monkeypatch.setattr(engine, "generate_with_stats", engine_spy)
    monkeypatch.setattr(sampling, "generate", static_spy)
    tokens, mask = _prompts()
    prompts = {
        "prompt_tokens": tokens,
        "prompt_mask": mask,
        "answer_tokens": np.zeros((4, 2), np.int32),
        "answer_mask": np.zeros((4, 2), np.int32),
        "route": np.zeros((4,), np.int32),
        "example_index": np.arange(4),
    }
    state = types.SimpleNamespace(rng=jax.random.key(5), step=0)
    rollouts = {}
    for name in ("static", "engine"):
        stage = types.SimpleNamespace(
            run=types.SimpleNamespace(
                config=_config(name),
                mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                model_config=CONFIG,
                tokenizer=types.SimpleNamespace(eos_id=EOS, pad_id=0),
                sampler_mesh=None,
            ),
            config=ml_collections.ConfigDict(dict(top_p=1.0, top_k=0)),
            rollout_params=params,
            turn_sampler=None,
        )
        stage.sampling_kwargs = lambda n, t, stage=stage: RolloutStage.sampling_kwargs(stage, n, t)
        _, rollouts[name] = RolloutStage.rollout(stage, state, prompts, 4, 1.0)
        assert len(calls[name]) == 1 and sum(map(len, calls.values())) == 1 + (name == "engine")
    assert rollouts == {"static": "static rollout", "engine": "engine rollout"}
    kwargs = calls["engine"][0]
    assert (kwargs["num_slots"], kwargs["page_size"], kwargs["num_samples"]) == (3, PAGE, 4)
    assert kwargs["max_new_tokens"] == LENGTH and kwargs["eos_id"] == EOS
    assert {k: v for k, v in kwargs.items() if k not in ("num_slots", "page_size")} == calls["static"][0]
