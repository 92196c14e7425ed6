"""The rollout engine's decode path (grpo_jax.rollout.paged_cache, engine.decode_params): the Pallas paged
kernel against the XLA reference, the engine on the kernel, and the decode layout of the weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rollout_engine import _prompts  # left-padded prompts of lengths 5, 3, 4, 1 in width 6

from grpo_jax import models, sampling, sharding
from grpo_jax.rollout import engine, paged_cache
from grpo_jax.testing import tiny_model_config, tiny_params

EOS = 1
STOPS = (3, 7, 9, 20, 31)


def _random_pages(seed, *, kv_heads=2, group=2, head_dim=128, total_pages=24, page_size=4, slots=4, width=4):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(slots, kv_heads * group, head_dim)), jnp.float32)
    shape = (kv_heads, total_pages, page_size, head_dim)
    k_pages = jnp.asarray(r.normal(size=shape), jnp.bfloat16)
    v_pages = jnp.asarray(r.normal(size=shape), jnp.bfloat16)
    table = jnp.asarray(r.permutation(total_pages)[: slots * width].reshape(slots, width), jnp.int32)
    return q, k_pages, v_pages, table


def test_pallas_paged_kernel_in_interpret_mode_matches_the_xla_reference():
    """JAX's Pallas TPU paged-attention kernel (Pallas TPU interpret mode on this CPU) and
    `paged_attention_reference` on random bfloat16 pages, a shuffled page table and lengths from one key
    to the whole table (the kernel reads K/V in bfloat16, as the pages are here)."""
    q, k_pages, v_pages, table = _random_pages(0)
    lengths = jnp.array([1, 7, 16, 12], jnp.int32)  # one key; a partly filled page; all 4 pages; 3 pages
    ref = paged_cache.paged_attention_reference(q, k_pages, v_pages, lengths, table)
    for block_tokens in (8, 16):  # 2 pages per kernel block, and the whole table in one
        out = jax.jit(
            lambda *a, b=block_tokens: paged_cache.paged_attention_kernel(*a, interpret=True, block_tokens=b)
        )(q, k_pages, v_pages, lengths, table)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    # Keys past the length are never read: garbage there changes nothing.
    poisoned = k_pages.at[:, table[0, 1:]].set(1e4)
    out = paged_cache.paged_attention_kernel(q, poisoned, v_pages, lengths, table, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[0], np.asarray(ref)[0], atol=2e-5, rtol=2e-5)


def test_the_chunked_reference_equals_the_one_pass_reference():
    """Over a long table the XLA reference reads chunks of pages up to the longest slot's length and
    merges them by an online softmax: the same attention as one softmax over the whole table."""
    q, k_pages, v_pages, table = _random_pages(1, total_pages=40, slots=4, width=9)
    k_pages, v_pages = k_pages.astype(jnp.float32), v_pages.astype(jnp.float32)
    for lengths in ([1, 7, 36, 20], [3, 2, 1, 4]):  # the whole table; one chunk only
        lengths = jnp.asarray(lengths, jnp.int32)
        one = paged_cache.paged_attention_reference(q, k_pages, v_pages, lengths, table)
        for chunk in (1, 2, 4):
            out = paged_cache.paged_attention_reference(
                q, k_pages, v_pages, lengths, table, chunk_pages=chunk
            )
            np.testing.assert_allclose(np.asarray(out), np.asarray(one), atol=1e-5, rtol=1e-5)


def test_the_engine_on_the_pallas_kernel_matches_the_static_sampler():
    """attention_impl="splash" decodes through the Pallas paged kernel (interpret mode here), with the page
    accounting exact. The kernel holds K/V in bfloat16, so the model computes in bfloat16 as on a TPU and
    the static sampler is the reference at that dtype: the same greedy tokens, logprobs to bfloat16
    tolerance."""
    config = tiny_model_config(dtype="bfloat16", head_dim=128)
    params = tiny_params(config, seed=3)
    tokens, mask = _prompts()
    common = dict(num_samples=2, max_new_tokens=6, temperature=0.0, eos_id=EOS, stop_ids=STOPS)
    ref = sampling.generate(config, params, tokens, mask, jax.random.key(5), **common)
    kernel_config = config.replace(attention_impl="splash", attention_interpret=True)
    out, stats = engine.generate_with_stats(
        kernel_config,
        params,
        tokens,
        mask,
        jax.random.key(5),
        num_slots=3,
        page_size=4,
        check_pages=True,
        **common,
    )
    stats = jax.tree_util.tree_map(int, stats)
    assert stats.page_errors == 0 and stats.free_pages == stats.num_pages and stats.pool_underflows == 0
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=0.05)
    with pytest.raises(ValueError, match="attention_impl='splash' needs a TPU"):
        engine.generate(
            config.replace(attention_impl="splash"),
            params,
            tokens,
            mask,
            jax.random.key(0),
            num_slots=3,
            **common,
        )


# ------------------------------------------------------------------------------------------------
# The decode layout
# ------------------------------------------------------------------------------------------------


def _computations(hlo: str) -> dict[str, list[str]]:
    out, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return out


def _called(computations, name, seen):
    if name in seen or name not in computations:
        return seen
    seen.add(name)
    for line in computations[name]:
        for group in re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?(%[\w.\-]+(?:, %[\w.\-]+)*)", line
        ):
            for callee in group.split(","):
                _called(computations, callee.strip().lstrip("%"), seen)
    return seen


def decode_loop_all_gathers(hlo: str) -> list[str]:
    """The all-gathers of the compiled engine's decode loop: the `while` whose body (with everything it
    calls) is largest (the prefill's layer scan and the first-token map are smaller loops)."""
    computations = _computations(hlo)
    bodies = [
        m.group(1)
        for lines in computations.values()
        for line in lines
        for m in [re.search(r"while\(.*body=%?([\w.\-]+)", line)]
        if m
    ]
    closures = {b: _called(computations, b, set()) for b in bodies}
    loop = max(closures, key=lambda b: sum(len(computations[c]) for c in closures[b]))
    return [line.strip() for c in closures[loop] for line in computations[c] if " all-gather(" in line]


def test_the_decode_layout_gathers_the_weights_once_not_inside_the_decode_loop():
    """On a mesh with fsdp = 4, the engine's decode loop reads weights placed once per rollout
    (`engine.decode_params`: compute dtype, `tensor` only): no all-gather inside the loop has a
    [hidden]-sized dimension. With `decode_layout=False` every layer's weights are gathered over fsdp at
    every decode step (the check fails)."""
    config = tiny_model_config(hidden_size=48)  # a hidden size no other dimension of the program has
    params = tiny_params(config, seed=3)
    mesh = sharding.make_mesh((1, 4, 2))
    placed = jax.device_put(params, models.model_param_shardings(mesh, config))
    tokens, mask = _prompts()
    batch = sharding.shard_batch({"t": tokens, "m": mask}, mesh)
    gathers = {}
    for layout in (True, False):
        fn = jax.jit(
            lambda p, t, m, layout=layout: engine.generate_with_stats(
                config,
                p,
                t,
                m,
                jax.random.key(5),
                num_samples=2,
                max_new_tokens=8,
                eos_id=EOS,
                num_slots=4,
                page_size=4,
                mesh=mesh,
                decode_layout=layout,
            )
        )
        hlo = fn.lower(placed, batch["t"], batch["m"]).compile().as_text()
        gathers[layout] = [g for g in decode_loop_all_gathers(hlo) if re.search(r"\[([\d,]*,)?48[,\]]", g)]
    assert gathers[True] == [], gathers[True]
    assert len(gathers[False]) >= config.num_layers, "the check no longer sees the per-step weight gathers"


def test_decode_params_cast_place_and_unstack():
    config = tiny_model_config(param_dtype="float32", dtype="bfloat16")
    params = tiny_params(config, seed=0)
    mesh = sharding.make_mesh((1, 4, 2))
    placed = jax.device_put(params, models.model_param_shardings(mesh, config))
    out = jax.jit(lambda p: engine.decode_params(config, p, mesh))(placed)
    assert isinstance(out["layers"], tuple) and len(out["layers"]) == config.num_layers
    for leaf in jax.tree_util.tree_leaves(out):
        assert leaf.dtype == jnp.bfloat16
        assert "fsdp" not in jax.tree_util.tree_leaves(tuple(leaf.sharding.spec)), leaf.sharding.spec
    np.testing.assert_array_equal(
        np.asarray(out["layers"][1]["q"], np.float32),
        np.asarray(params["layers"]["q"][1].astype(jnp.bfloat16), np.float32),
    )
    assert out["layers"][0]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")


def test_rows_that_stop_at_token_0_never_take_a_slot_and_free_their_prompt():
    """Token 0 is drawn from the prefill before the loop: a row that stops there is finished at once, and
    a prompt all of whose rows did returns its pages before the first decode step; the rest decode as the
    static sampler does, with exact page accounting."""
    config = tiny_model_config()
    params = tiny_params(config, seed=3)
    tokens, mask = _prompts()
    common = dict(num_samples=2, max_new_tokens=6, temperature=0.0, eos_id=EOS)
    first = np.asarray(sampling.generate(config, params, tokens, mask, jax.random.key(5), **common).tokens)[
        :, 0
    ]
    stops = (int(first[0]),)  # prompt 0's greedy token 0: both of its rows stop at once
    ref = sampling.generate(config, params, tokens, mask, jax.random.key(5), stop_ids=stops, **common)
    out, stats = engine.generate_with_stats(
        config,
        params,
        tokens,
        mask,
        jax.random.key(5),
        stop_ids=stops,
        num_slots=3,
        page_size=4,
        check_pages=True,
        **common,
    )
    lengths = np.asarray(ref.lengths)
    assert lengths[0] == lengths[1] == 1 and lengths.max() > 1
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(out.truncated), np.asarray(ref.truncated))
    stats = jax.tree_util.tree_map(int, stats)
    assert stats.page_errors == 0 and stats.free_pages == stats.num_pages and stats.slots == 3
    assert stats.iterations >= (lengths - 1).sum() / 3
