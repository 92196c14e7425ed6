"""The rollout engine: continuous batching over a paged KV cache, each prompt's pages shared by its group.

Same contract and numbers as `grpo_jax.sampling.generate` (the static sampler, its reference): the same
arguments plus `num_slots` and `page_size`, the same `Rollout` (row b·G + j is sample j of prompt b), and
the same random stream per row, so the tokens are equal and the logprobs agree to float tolerance.

How it runs, in one jitted program:

- Prefill (once per distinct prompt): the B prompts, left-padded further to a whole number of pages
  (P_pad = ceil(P / page_size) · page_size, so a sample's own tokens start on a fresh page), go through
  `forward_with_cache` into a dense [B, P_pad] cache that becomes pages 0 .. B·P_pages − 1 of the pool;
  each prompt keeps its last logits (its samples' first token) and a refcount of G.
- Work queue: items 0 .. N − 1 in row order (item r is sample r % G of prompt r // G).
- Continuous batching (Orca; Yu et al., OSDI 2022): S slots decode together in one `lax.while_loop`. Each
  iteration (1) gives every idle slot the next queued item (page table = its prompt's pages, logits = the
  prompt's last logits, t = 0); (2) draws token t of every live slot with `sampling.choose_tokens` from
  `fold_in(row key, t)`, t being the row's own token index, and writes it to the item's output row;
  (3) retires the slots whose sample stopped (stop token or budget): length and `truncated` written,
  its own pages pushed back to the pool, its prompt's refcount decremented and the prompt's pages
  pushed back when it reaches 0; (4) feeds every live slot's new token through the model
  (`paged_cache.decode_step`), taking a page from the pool when the token starts one.
  The loop ends when the queue is empty and every slot is idle.
- Paged KV cache (PagedAttention; Kwon et al., SOSP 2023, arXiv 2309.06180): `grpo_jax.rollout.paged_cache`.
  The pool holds B·P_pages prompt pages plus S·ceil((L − 1) / page_size) pages for the slots' own tokens
  (a slot's worst case), so it never runs dry; the pages in use at any time follow the tokens really
  held (`EngineStats.peak_pages_in_use`).

- Data shards: on a mesh whose data-parallel size D (the ("data", "fsdp") axes) divides B, the engine is
  D independent sub-engines, one per data shard, run as one `jax.vmap` over a leading shard axis placed
  over those axes (`spmd_axis_name`): shard d takes prompts [d·B/D, (d+1)·B/D), ceil(S/D) slots and a
  pool of its own (its prompts' pages plus its slots' worst case), so a device holds its shard's pages
  only (KV heads still over `tensor`), not the whole pool. The shards step together until the last one
  is done. Otherwise one engine runs, its pool whole on every row shard.

Positions and masks are the static sampler's: prompt positions count real tokens (`positions_from_mask`),
token t of a sample sits at position (prompt length + t), and a slot attends to its prompt's real tokens
and its own tokens so far; the padding between the two regions is masked.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.inputs import as_key
from grpo_jax.models import (
    ModelConfig,
    activation_sharding,
    forward_with_cache,
    init_cache,
    positions_from_mask,
)
from grpo_jax.rollout import paged_cache
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


@flax.struct.dataclass
class EngineState:
    """The loop state. S slots, N = B·G items, L = max_new_tokens, MP pages per slot."""

    next_item: jax.Array  # [] the queue's head
    item: jax.Array  # [S] the item a slot decodes (N: idle)
    t: jax.Array  # [S] tokens drawn so far for it (the row's own token index)
    logits: jax.Array  # [S, V] predict token t
    own_pages: jax.Array  # [S] pages of its own tokens it holds
    page_table: jax.Array  # [S, MP] its prompt's pages, then its own (scratch where unused)
    refcount: jax.Array  # [B] a prompt's samples not finished yet
    pool: paged_cache.PagePool
    pages: dict  # {"k", "v"} [layers, num_pages + 1, page_size, K, Dh]
    tokens: jax.Array  # [N, L] outputs, written by row
    logprobs: jax.Array  # [N, L]
    sampling_logprobs: jax.Array  # [N, L]
    mask: jax.Array  # [N, L]
    lengths: jax.Array  # [N]
    truncated: jax.Array  # [N]
    iterations: jax.Array
    peak_in_use: jax.Array
    page_errors: jax.Array
    underflows: jax.Array
    pages_taken: jax.Array


def _shards(mesh, batch: int) -> int:
    """D, the number of independent sub-engines: the data-parallel size of the mesh where the B prompts
    split evenly over it, else 1 (one engine, its pool replicated over the batch axes)."""
    if mesh is None:
        return 1
    d = data_parallel_size(mesh)
    return d if batch % d == 0 else 1


def _constraints(mesh, sharded: bool):
    """(constrain_slots, constrain_pages) for one sub-engine's arrays.

    sharded (D > 1, traced under `jax.vmap(..., spmd_axis_name=BATCH_AXES)`): the vmapped shard axis is
    what goes over the batch axes, so inside a shard slot-major arrays are whole and pages keep only their
    KV heads over `tensor`; vmap adds the batch axes in front. Not sharded (one engine on a mesh): slot-
    and row-major arrays go over the batch axes where they divide and the pages are whole on every row
    shard (any slot may read any page)."""
    if mesh is None:
        return (lambda x: x), (lambda pages: pages)

    def pin(x, spec):
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, PartitionSpec(*spec)))

    def constrain_pages(pages):  # [layers, pages, page_size, K, Dh]
        tensor = mesh.shape["tensor"]
        return jax.tree_util.tree_map(
            lambda p: pin(p, (None, None, None, "tensor" if p.shape[3] % tensor == 0 else None, None)), pages
        )

    if sharded:
        return (lambda x: pin(x, (None,) * x.ndim)), constrain_pages
    return (lambda x: sampling._constrain_rows(x, mesh, 0)), constrain_pages


def _shard_engine(
    model_config,
    params,
    prompt_tokens,
    prompt_mask,
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
    constrain_slots,
    constrain_pages,
):
    """One engine over B prompts (one data shard's, or all of them) with its own slots, queue and page
    pool: row_keys [B·G] are its rows' streams. -> (Rollout fields of its rows, EngineStats)."""
    batch, prompt_len = prompt_tokens.shape
    g, length = num_samples, max_new_tokens
    n, s = batch * g, num_slots
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_pages = -(-prompt_len // page_size)
    prompt_pad = prompt_pages * page_size
    own_max = -(-(length - 1) // page_size)  # token L-1 is never fed, so L-1 tokens at most in the cache
    max_pages = prompt_pages + max(own_max, 1)
    num_prompt_pages = batch * prompt_pages
    num_pages = num_prompt_pages + s * own_max
    scratch = num_pages

    # Prefill each distinct prompt once, left-padded to whole pages; its cache becomes its pages.
    extra = prompt_pad - prompt_len
    padded_tokens = jnp.pad(prompt_tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
    padded_mask = jnp.pad(prompt_mask, ((0, 0), (extra, 0)))
    logits, cache = forward_with_cache(
        model_config,
        params,
        padded_tokens,
        positions_from_mask(padded_mask),
        init_cache(model_config, batch, prompt_pad),
        0,
        padded_mask,
        last_only=True,
    )
    prompt_logits = logits[:, -1]  # [B, V]: token 0 of each sample
    free_shape = (model_config.num_layers, num_pages + 1 - num_prompt_pages, page_size)
    pages = {
        name: jnp.concatenate(
            [
                c.reshape(model_config.num_layers, num_prompt_pages, page_size, *c.shape[3:]),
                jnp.zeros(free_shape + c.shape[3:], c.dtype),
            ],
            axis=1,
        )
        for name, c in cache.items()
    }
    pages = constrain_pages(pages)
    prompt_page_ids = jnp.arange(num_prompt_pages, dtype=jnp.int32).reshape(batch, prompt_pages)
    prompt_table = jnp.concatenate(
        [prompt_page_ids, jnp.full((batch, max_pages - prompt_pages), scratch, jnp.int32)], axis=1
    )
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)  # [B]: position of token 0

    choose = functools.partial(
        sampling.choose_tokens,
        stop_ids=stop_ids,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    stop_ids_arr = jnp.asarray(stop_ids, jnp.int32)
    slots = jnp.arange(s)
    own_columns = jnp.arange(max_pages - prompt_pages)
    completion_slots = jnp.arange((max_pages - prompt_pages) * page_size)

    def held_pages(st: EngineState):
        """Pages owned by live samples (their own) and by prompts with unfinished samples."""
        live = st.item < n
        own = st.page_table[:, prompt_pages:]
        own_valid = live[:, None] & (own_columns[None, :] < st.own_pages[:, None])
        prompt_valid = jnp.broadcast_to((st.refcount > 0)[:, None], prompt_page_ids.shape)
        held = jnp.concatenate([own.reshape(-1), prompt_page_ids.reshape(-1)])
        return held, jnp.concatenate([own_valid.reshape(-1), prompt_valid.reshape(-1)])

    def body(st: EngineState) -> EngineState:
        # 1. Admit: idle slots take the next queued items, in row order.
        idle = st.item == n
        candidate = st.next_item + jnp.cumsum(idle.astype(jnp.int32)) - 1
        admit = idle & (candidate < n)
        item = jnp.where(admit, candidate, st.item)
        prompt = jnp.minimum(item, n - 1) // g
        t = jnp.where(admit, 0, st.t)
        logits = jnp.where(admit[:, None], prompt_logits[prompt], st.logits)
        page_table = jnp.where(admit[:, None], prompt_table[prompt], st.page_table)
        live = item < n

        # 2. Draw token t of every live slot from its row's stream at its own index t.
        token, logp, sampling_logp = choose(logits, row_keys[jnp.minimum(item, n - 1)], t)
        token = jnp.where(live, token, pad_id)
        row = jnp.where(live, item, n)  # n: dropped
        put = lambda buf, value: buf.at[row, t].set(value, mode="drop")
        tokens = put(st.tokens, token)
        logprobs = put(st.logprobs, logp)
        sampling_logprobs = put(st.sampling_logprobs, sampling_logp)
        mask = put(st.mask, jnp.ones_like(token))
        stopped = live & jnp.isin(token, stop_ids_arr)
        t = t + live
        done = live & (stopped | (t >= length))

        # 3. Retire: outputs of finished rows, their pages (and their prompt's, once all G are done) freed.
        finished = jnp.where(done, item, n)
        lengths = st.lengths.at[finished].set(t, mode="drop")
        truncated = st.truncated.at[finished].set(~stopped, mode="drop")
        refcount = st.refcount.at[jnp.where(done, prompt, batch)].add(-1, mode="drop")
        prompt_freed = (refcount == 0) & (st.refcount > 0)
        own = page_table[:, prompt_pages:]
        own_freed = done[:, None] & (own_columns[None, :] < st.own_pages[:, None])
        prompt_freed = jnp.broadcast_to(prompt_freed[:, None], prompt_page_ids.shape)
        pool = paged_cache.push_pages(
            st.pool,
            jnp.concatenate([own.reshape(-1), prompt_page_ids.reshape(-1)]),
            jnp.concatenate([own_freed.reshape(-1), prompt_freed.reshape(-1)]),
        )
        item = jnp.where(done, n, item)
        own_pages = jnp.where(done, 0, st.own_pages)
        page_table = jnp.where(done[:, None], scratch, page_table)
        live = item < n

        # 4. Feed each live slot's new token (index c = t - 1) through the model; a token that starts a
        # page takes one from the pool.
        c = t - 1
        need = live & (c % page_size == 0)
        pool, new_page = paged_cache.pop_pages(pool, need)
        column = prompt_pages + c // page_size
        page_table = page_table.at[slots, jnp.where(need, column, max_pages)].set(new_page, mode="drop")
        own_pages = own_pages + need
        write_page = jnp.where(live, page_table[slots, jnp.clip(column, 0, max_pages - 1)], scratch)
        kv_valid = (
            jnp.concatenate([padded_mask[prompt] > 0, completion_slots[None, :] <= c[:, None]], axis=1)
            & live[:, None]
        )
        logits, pages = paged_cache.decode_step(
            model_config,
            params,
            token,
            prompt_lengths[prompt] + c,
            st.pages,
            page_table,
            kv_valid,
            write_page,
            jnp.where(live, c % page_size, 0),
        )
        new = st.replace(
            next_item=st.next_item + jnp.sum(admit, dtype=jnp.int32),
            item=constrain_slots(item),
            t=constrain_slots(t),
            logits=constrain_slots(logits),
            own_pages=own_pages,
            page_table=constrain_slots(page_table),
            refcount=refcount,
            pool=pool,
            pages=constrain_pages(pages),
            tokens=constrain_slots(tokens),
            logprobs=constrain_slots(logprobs),
            sampling_logprobs=constrain_slots(sampling_logprobs),
            mask=constrain_slots(mask),
            lengths=lengths,
            truncated=truncated,
            iterations=st.iterations + 1,
            peak_in_use=jnp.maximum(st.peak_in_use, num_pages - pool.free_count),
            underflows=st.underflows + (pool.free_count < 0),
            pages_taken=st.pages_taken + jnp.sum(need, dtype=jnp.int32),
        )
        if check_pages:  # every page has exactly one owner: the pool, one live sample, or one live prompt;
            # and a live sample's prompt is live (its pages not returned while a sample reads them)
            counts = paged_cache.page_holders(new.pool, *held_pages(new))
            orphans = (new.item < n) & (new.refcount[jnp.minimum(new.item, n - 1) // g] <= 0)
            errors = jnp.sum(counts != 1, dtype=jnp.int32) + jnp.sum(orphans, dtype=jnp.int32)
            new = new.replace(page_errors=new.page_errors + errors)
        return new

    zeros = jnp.zeros((n, length), jnp.float32)
    zero = jnp.asarray(0, jnp.int32)
    state = EngineState(
        next_item=zero,
        item=jnp.full((s,), n, jnp.int32),
        t=jnp.zeros((s,), jnp.int32),
        logits=jnp.zeros((s, prompt_logits.shape[-1]), jnp.float32),
        own_pages=jnp.zeros((s,), jnp.int32),
        page_table=jnp.full((s, max_pages), scratch, jnp.int32),
        refcount=jnp.full((batch,), g, jnp.int32),
        pool=paged_cache.pool_with_free(num_pages, num_prompt_pages),
        pages=pages,
        tokens=constrain_slots(jnp.full((n, length), pad_id, jnp.int32)),
        logprobs=constrain_slots(zeros),
        sampling_logprobs=constrain_slots(zeros),
        mask=constrain_slots(jnp.zeros((n, length), jnp.int32)),
        lengths=jnp.zeros((n,), jnp.int32),
        truncated=jnp.zeros((n,), bool),
        iterations=zero,
        peak_in_use=jnp.asarray(num_prompt_pages, jnp.int32),
        page_errors=zero,
        underflows=zero,
        pages_taken=zero,
    )
    state = jax.lax.while_loop(lambda st: (st.next_item < n) | jnp.any(st.item < n), body, state)
    outputs = {
        name: getattr(state, name)
        for name in ("tokens", "logprobs", "sampling_logprobs", "mask", "lengths", "truncated")
    }
    stats = EngineStats(
        num_pages=jnp.asarray(num_pages, jnp.int32),
        free_pages=state.pool.free_count,
        peak_pages_in_use=state.peak_in_use,
        page_errors=state.page_errors,
        pool_underflows=state.underflows,
        pages_taken=state.pages_taken,
        iterations=state.iterations,
        prompt_pages=jnp.asarray(num_prompt_pages, jnp.int32),
    )
    return outputs, stats


def _engine_body(model_config, params, prompt_tokens, prompt_mask, rng, *, mesh, num_slots, **static):
    """D = `_shards(mesh, B)` sub-engines, one per data shard: shard d takes prompts [d·B/D, (d+1)·B/D)
    (whole groups, so its rows are rows [d·N/D, (d+1)·N/D) of the output), ceil(S/D) slots and a pool of
    its own. With D > 1 they run as one `jax.vmap` over a leading shard axis placed over the batch axes
    (`spmd_axis_name`): each data shard holds its own slots and pages and only its rows' outputs."""
    batch, g = prompt_tokens.shape[0], static["num_samples"]
    n = batch * g
    row_keys = sampling.sample_keys(rng, prompt_tokens, prompt_mask, g)  # [N]
    d = _shards(mesh, batch)
    slots = min(-(-num_slots // d), n // d)
    constrain_slots, constrain_pages = _constraints(mesh, sharded=d > 1)
    run = functools.partial(
        _shard_engine,
        model_config,
        params,
        num_slots=slots,
        constrain_slots=constrain_slots,
        constrain_pages=constrain_pages,
        **static,
    )
    if d == 1:
        outputs, stats = run(prompt_tokens, prompt_mask, row_keys)
    else:
        split = lambda x: x.reshape(d, x.shape[0] // d, *x.shape[1:])  # noqa: E731
        with activation_sharding(None):  # the shard axis, not each shard's rows, goes over the batch axes
            outputs, stats = jax.vmap(run, spmd_axis_name=BATCH_AXES)(
                split(prompt_tokens), split(prompt_mask), split(row_keys)
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
        )
    rollout = sampling.Rollout(
        **outputs,
        prompt_tokens=jnp.repeat(prompt_tokens, g, axis=0),
        prompt_mask=jnp.repeat(prompt_mask, g, axis=0),
        num_steps=jnp.max(outputs["lengths"]),  # the static sampler's decode steps: its longest row
    )
    return rollout, stats


@functools.partial(
    jax.jit, static_argnames=(*sampling.STATIC_ARGNAMES, "num_slots", "page_size", "check_pages")
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
) -> tuple[sampling.Rollout, EngineStats]:
    """`generate`, plus the run's `EngineStats`; `check_pages` counts page-ownership errors every iteration
    (a debugging aid: it adds a histogram over the pool to each step)."""
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
    )


def generate(
    model_config: ModelConfig, params, prompt_tokens, prompt_mask, rng, **kwargs
) -> sampling.Rollout:
    """`sampling.generate`'s contract (docs/CONTRACTS.md) from the rollout engine: the same arguments plus
    `num_slots` (S decode slots; None: one per row, N = B·G) and `page_size` (tokens per KV page), the same
    `Rollout`, the same tokens for the same rng."""
    return generate_with_stats(model_config, params, prompt_tokens, prompt_mask, rng, **kwargs)[0]
