"""The rollout engine: continuous batching over a paged KV cache, each prompt's pages shared by its group.

Same contract and numbers as `grpo_jax.sampling.generate` (the static sampler, its reference): the same
arguments plus `num_slots` and `page_size`, the same `Rollout` (row b·G + j is sample j of prompt b), and
the same random stream per row, so the tokens are equal and the logprobs agree to float tolerance.

The state machine (group entries, queue, slots, pages, the decode iteration, turns) is
`grpo_jax.rollout.slots`, whose docstring says how a call runs; its names are re-exported here.

- Data shards: on a mesh whose data-parallel size D (the ("data", "fsdp") axes) divides B, the engine is
  D independent sub-engines, one per data shard, run as one `jax.vmap` over a leading shard axis placed
  over those axes (`spmd_axis_name`): shard d takes prompts [d·B/D, (d+1)·B/D), ceil(S/D) slots and a
  pool of its own (its prompts' pages plus its slots' worst case), so a device holds its shard's pages
  only (KV heads still over `tensor`), not the whole pool. The shards step together until the last one
  is done. Otherwise one engine runs, its pool whole on every row shard.

Positions are the static sampler's: prompt positions count real tokens (`positions_from_mask`), token t
of a sample sits at position (prompt length + t), and a slot attends to its prompt's real tokens and its
own tokens so far.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.inputs import as_key
from grpo_jax.models import ModelConfig, activation_sharding
from grpo_jax.rollout.decode_layout import DECODE_RULES, decode_params, decode_specs  # noqa: F401 (API)
from grpo_jax.rollout.engine_state import EngineState, Geometry, init_state, pool_geometry  # noqa: F401 (API)
from grpo_jax.rollout.slots import (  # noqa: F401 (the engine's API)
    _constraints,
    advance,
    complete_groups,
    enqueue,
    paged_attention_of,
    prefill,
    resume,
    token_chooser,
)
from grpo_jax.sharding import BATCH_AXES, data_parallel_size

PartitionSpec = jax.sharding.PartitionSpec


@flax.struct.dataclass
class EngineStats:
    """Counters of one engine run (scalars). `free_pages == num_pages` at the end: no page leaked."""

    num_pages: jax.Array  # pages in the pool (prompt pages + the slots' worst case)
    free_pages: jax.Array  # pages in the pool when the loop ended
    peak_pages_in_use: jax.Array  # most pages held at once (prompts + samples)
    page_errors: jax.Array  # with check_pages: Σ over iterations of pages without exactly one owner and
    # of live samples whose prompt's pages were returned
    pool_underflows: jax.Array  # iterations that asked an empty pool for a page (0 with this sizing)
    pages_taken: jax.Array  # pages popped from the pool over the run (> the pool's sample pages: reuse)
    iterations: jax.Array  # loop iterations = batched decode steps over the S slots
    prompt_pages: jax.Array  # B · P_pages
    slots: jax.Array  # decode slots really run: ceil(S / D) per data shard × D shards


def _shards(mesh, batch: int) -> int:
    """D, the number of independent sub-engines: the data-parallel size of the mesh where the B prompts
    split evenly over it, else 1 (one engine, its pool replicated over the batch axes)."""
    if mesh is None:
        return 1
    d = data_parallel_size(mesh)
    return d if batch % d == 0 else 1


def _shard_engine(
    model_config,
    loop_params,
    prompt_mask,
    prompt_logits,
    cache,
    row_keys,
    *,
    num_samples,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    stop_ids,
    min_new_tokens,
    pad_id,
    num_slots,
    page_size,
    check_pages,
    attention,
    kernel_mesh,
    constrain_slots,
    constrain_pages,
    vmap=None,
):
    """One engine over B prompts (one data shard's, or all of them) with its own slots, queue and page
    pool: prompt_logits [B, V] and cache {"k", "v"} [layers, B, P, K, Dh] are its prompts' prefill,
    row_keys [B·G] its rows' streams; `loop_params` (the decode layout, or the params as given) decode.
    One entry per prompt, all enqueued at once and decoded to the end (no budget), so entry b is prompt b
    and the output rows are the items in order. -> (Rollout fields of its rows, EngineStats). `vmap`: the
    inputs hold D shards' on a leading axis (the cache on its second), each an engine of its own (see
    `advance`), and so do the results."""
    batch, prompt_len = prompt_mask.shape[-2:]
    geom = Geometry(
        entries=batch,
        group=num_samples,
        slots=num_slots,
        prompt_len=prompt_len,
        length=max_new_tokens,
        page_size=page_size,
        vocab=model_config.vocab_size,
        pad_id=pad_id,
        attention=attention,
    )
    choose = token_chooser(
        stop_ids=stop_ids, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    everything = jnp.ones((batch,), bool)

    def start(mask, logits, cache, keys):
        st = init_state(geom, model_config, key_template=keys[0])
        return enqueue(
            geom,
            model_config,
            st,
            mask,
            logits,
            cache,
            keys,
            everything,
            0,
            choose=choose,
            stop_ids=stop_ids,
            constrain_pages=constrain_pages,
        )

    if vmap is None:
        st = start(prompt_mask, prompt_logits, cache, row_keys)
    else:
        st = vmap(start, in_axes=(0, 0, 1, 0))(prompt_mask, prompt_logits, cache, row_keys)
    st = advance(
        geom,
        model_config,
        loop_params,
        st,
        budget=jnp.iinfo(jnp.int32).max,
        target=batch,
        version=0,
        choose=choose,
        stop_ids=stop_ids,
        check_pages=check_pages,
        kernel_mesh=kernel_mesh,
        constrain_slots=constrain_slots,
        constrain_pages=constrain_pages,
        vmap=vmap,
    )
    outputs = {
        name: getattr(st, name)
        for name in ("tokens", "logprobs", "sampling_logprobs", "mask", "lengths", "truncated")
    }
    each = vmap or (lambda f: f)
    stats = each(
        lambda st: EngineStats(
            num_pages=jnp.asarray(geom.num_pages, jnp.int32),
            free_pages=st.pool.free_count,
            peak_pages_in_use=st.peak_in_use,
            page_errors=st.page_errors,
            pool_underflows=st.underflows,
            pages_taken=st.pages_taken,
            iterations=st.iterations,
            prompt_pages=jnp.asarray(batch * geom.prompt_pages, jnp.int32),
            slots=jnp.asarray(geom.slots, jnp.int32),
        )
    )(st)
    return outputs, stats


def _engine_body(
    model_config, params, prompt_tokens, prompt_mask, rng, *, mesh, num_slots, decode_layout, **static
):
    """D = `_shards(mesh, B)` sub-engines, one per data shard: shard d takes prompts [d·B/D, (d+1)·B/D)
    (whole groups, so its rows are rows [d·N/D, (d+1)·N/D) of the output), ceil(S/D) slots and a pool of
    its own. With D > 1 they run as one `jax.vmap` over a leading shard axis placed over the batch axes
    (`spmd_axis_name`): each data shard holds its own slots and pages and only its rows' outputs. The
    prefill runs before, once for all prompts on the mesh's layout."""
    attention = paged_attention_of(model_config)
    batch, g = prompt_tokens.shape[0], static["num_samples"]
    n = batch * g
    row_keys = sampling.sample_keys(rng, prompt_tokens, prompt_mask, g)  # [N]
    prompt_logits, cache = prefill(model_config, params, prompt_tokens, prompt_mask)
    d = _shards(mesh, batch)
    slots = min(-(-num_slots // d), n // d)
    constrain_slots, constrain_pages = _constraints(mesh, sharded=d > 1)
    loop_params = decode_params(model_config, params, mesh) if decode_layout else params
    run = functools.partial(
        _shard_engine,
        model_config,
        loop_params,
        num_slots=slots,
        attention=attention,
        kernel_mesh=mesh,
        constrain_slots=constrain_slots,
        constrain_pages=constrain_pages,
        **static,
    )
    if d == 1:
        outputs, stats = run(prompt_mask, prompt_logits, cache, row_keys)
    else:
        split = lambda x, axis=0: x.reshape(*x.shape[:axis], d, x.shape[axis] // d, *x.shape[axis + 1 :])  # noqa: E731
        cache = jax.tree_util.tree_map(lambda c: split(c, 1), cache)  # [layers, D, B/D, P, K, Dh]
        with activation_sharding(None):  # the shard axis, not each shard's rows, goes over the batch axes
            outputs, stats = run(
                split(prompt_mask),
                split(prompt_logits),
                cache,
                split(row_keys),
                vmap=functools.partial(jax.vmap, spmd_axis_name=BATCH_AXES),
            )
        outputs = {
            k: sampling._constrain_rows(v.reshape(n, *v.shape[2:]), mesh, 0) for k, v in outputs.items()
        }
        total = lambda x: jnp.sum(x, dtype=jnp.int32)  # noqa: E731
        stats = EngineStats(
            num_pages=total(stats.num_pages),
            free_pages=total(stats.free_pages),
            peak_pages_in_use=total(stats.peak_pages_in_use),  # Σ of the shards' peaks (an upper bound)
            page_errors=total(stats.page_errors),
            pool_underflows=total(stats.pool_underflows),
            pages_taken=total(stats.pages_taken),
            iterations=jnp.max(stats.iterations),  # the shards step together until the last is done
            prompt_pages=total(stats.prompt_pages),
            slots=total(stats.slots),
        )
    rollout = sampling.Rollout(
        **outputs,
        prompt_tokens=jnp.repeat(prompt_tokens, g, axis=0),
        prompt_mask=jnp.repeat(prompt_mask, g, axis=0),
        num_steps=jnp.max(outputs["lengths"]),  # the static sampler's decode steps: its longest row
    )
    return rollout, stats


@functools.partial(
    jax.jit,
    static_argnames=(*sampling.STATIC_ARGNAMES, "num_slots", "page_size", "check_pages", "decode_layout"),
)
def _generate(model_config, params, prompt_tokens, prompt_mask, rng, *, mesh, **static):
    """The jitted engine: `_engine_body` traced with the activation layout pinned to the mesh."""
    with activation_sharding(mesh):
        return _engine_body(model_config, params, prompt_tokens, prompt_mask, rng, mesh=mesh, **static)


def generate_with_stats(
    model_config: ModelConfig,
    params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int,
    stop_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
    pad_id: int = 0,
    mesh=None,
    num_slots: int | None = None,
    page_size: int = 16,
    check_pages: bool = False,
    decode_layout: bool = True,
) -> tuple[sampling.Rollout, EngineStats]:
    """`generate`, plus the run's `EngineStats`; `check_pages` counts page-ownership errors every iteration
    (a debugging aid: it adds a histogram over the pool to each step); `decode_layout=False` decodes with
    the params as given (stacked, cast and, on an fsdp mesh, gathered per layer at every step: the layout
    before `decode_params`, kept for comparisons)."""
    rng = as_key(rng, "generate(rng)")
    settings = sampling.static_settings(
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        stop_ids=stop_ids,
        min_new_tokens=min_new_tokens,
        pad_id=pad_id,
    )
    rows = int(jnp.shape(prompt_tokens)[0]) * settings["num_samples"]
    if num_slots is not None and num_slots < 1:
        raise ValueError(f"num_slots must be >= 1 (or None: one per row), got {num_slots}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    return _generate(
        model_config,
        params,
        jnp.asarray(prompt_tokens, jnp.int32),
        jnp.asarray(prompt_mask),
        rng,
        **settings,
        mesh=mesh,
        num_slots=min(int(num_slots or rows), rows),
        page_size=int(page_size),
        check_pages=bool(check_pages),
        decode_layout=bool(decode_layout),
    )


def generate(
    model_config: ModelConfig, params, prompt_tokens, prompt_mask, rng, **kwargs
) -> sampling.Rollout:
    """`sampling.generate`'s contract (docs/CONTRACTS.md) from the rollout engine: the same arguments plus
    `num_slots` (S decode slots; None: one per row, N = B·G) and `page_size` (tokens per KV page), the same
    `Rollout`, the same tokens for the same rng."""
    return generate_with_stats(model_config, params, prompt_tokens, prompt_mask, rng, **kwargs)[0]
