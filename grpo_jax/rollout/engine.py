"""The rollout engine: continuous batching over a paged KV cache, each prompt's pages shared by its group.

Same contract and numbers as `grpo_jax.sampling.generate` (the static sampler, its reference): the same
arguments plus `num_slots` and `page_size`, the same `Rollout` (row b·G + j is sample j of prompt b), and
the same random stream per row, so the tokens are equal and the logprobs agree to float tolerance.

How it runs, in one jitted program, as three pure functions over an `EngineState` of Q group entries
(one-shot `generate`: Q = B, one entry per prompt; partial rollouts, `grpo_jax.rollout.partial`, carry
the state from one training step to the next):

- `enqueue` (prefill, once per distinct prompt): new prompts take free entries; left-padded further to a
  whole number of pages (P_pad = ceil(P / page_size) · page_size, so a sample's own tokens start on a
  fresh page), they go through `forward_with_cache` into a dense [B, P_pad] cache whose pages are taken
  from the pool (for a one-shot call: pages 0 .. B·P_pages − 1); each entry keeps its prompt's last
  logits (its samples' first token) and a refcount of G, and its G items (item q·G + j is sample j of
  entry q) join the work queue (a ring) in row order.
- `advance`, continuous batching (Orca; Yu et al., OSDI 2022): S slots decode together in one
  `lax.while_loop`. Each iteration (1) gives every idle slot the next queued item (page table = its
  prompt's pages, logits = the prompt's last logits, t = 0); (2) draws token t of every live slot with
  `sampling.choose_tokens` from `fold_in(row key, t)`, t being the row's own token index, and writes it
  to the item's output row; (3) retires the slots whose sample stopped (stop token or L): length and
  `truncated` written, its own pages pushed back to the pool, its group's refcount decremented and the
  prompt's pages pushed back when it reaches 0; (4) feeds every live slot's new token through the model
  (`paged_cache.decode_step`), taking a page from the pool when the token starts one. The loop ends when
  the queue is empty and every slot is idle, or (partial rollouts) when `target` groups are complete or
  `budget` iterations have run; slots still live then keep their item, logits and pages.
- Every token also records the policy version whose forward made the logits it was drawn from
  (`EngineState.version`): the behaviour policy of decoupled PPO when params change between calls.
- Paged KV cache (PagedAttention; Kwon et al., SOSP 2023, arXiv 2309.06180): `grpo_jax.rollout.paged_cache`.
  The pool holds Q·P_pages prompt pages plus S·ceil((L − 1) / page_size) pages for the slots' own tokens
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

import dataclasses
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
    """The engine between decode iterations, and between calls: partial rollouts carry it from one
    training step to the next. Q group entries (entry q holds one prompt and its G samples, items
    q·G .. q·G + G − 1), NQ = Q·G items, S slots, L = max_new_tokens, MP pages per slot, P_pad the
    prompt width in whole pages. A one-shot `generate` is one entry per prompt (Q = B)."""

    # Group entries.
    pending: jax.Array  # [Q] bool: holds a group not handed out yet (queued, decoding or complete)
    refcount: jax.Array  # [Q] its samples not finished yet (its prompt's pages are held while > 0)
    seq: jax.Array  # [Q] enqueue order: complete groups are handed out oldest first
    next_seq: jax.Array  # []
    prompt_table: jax.Array  # [Q, MP] its prompt's pages, then the scratch page
    prompt_valid: jax.Array  # [Q, P_pad] bool: real prompt tokens in those pages
    prompt_lengths: jax.Array  # [Q] position of token 0
    prompt_logits: jax.Array  # [Q, V] the prefill's last logits: token 0 of each sample
    prompt_version: jax.Array  # [Q] the policy version whose prefill made them
    payload: dict  # [Q, ...] arrays handed out with the group (e.g. its prompt and answer)
    row_keys: jax.Array  # [NQ] each item's random stream
    # The work queue: items in admission order, a ring over [NQ].
    queue: jax.Array  # [NQ]
    queue_head: jax.Array  # []
    queue_len: jax.Array  # []
    # Slots.
    item: jax.Array  # [S] the item a slot decodes (NQ: idle)
    t: jax.Array  # [S] tokens drawn so far for it (the row's own token index)
    logits: jax.Array  # [S, V] predict token t
    logits_version: jax.Array  # [S] the policy version whose forward made them
    own_pages: jax.Array  # [S] pages of its own tokens it holds
    page_table: jax.Array  # [S, MP] its prompt's pages, then its own (scratch where unused)
    pool: paged_cache.PagePool
    pages: dict  # {"k", "v"} [layers, num_pages + 1, page_size, K, Dh]
    # Outputs, by item.
    tokens: jax.Array  # [NQ, L]
    logprobs: jax.Array  # [NQ, L] behaviour logprobs (full softmax at the temperature)
    sampling_logprobs: jax.Array  # [NQ, L] under the distribution really sampled from
    mask: jax.Array  # [NQ, L]
    version: jax.Array  # [NQ, L] the policy version that drew each token
    lengths: jax.Array  # [NQ]
    truncated: jax.Array  # [NQ]
    # Counters over the engine's life.
    iterations: jax.Array
    peak_in_use: jax.Array
    page_errors: jax.Array
    underflows: jax.Array
    pages_taken: jax.Array
    dropped: jax.Array  # prompts enqueued with no free entry (0 when the caller checks free entries)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static sizes of one (sub-)engine: Q entries of G samples, S slots, prompts of P tokens, L new
    tokens, pages of `page_size` tokens, V logits, the pad token."""

    entries: int
    group: int
    slots: int
    prompt_len: int
    length: int
    page_size: int
    vocab: int
    pad_id: int = 0

    @property
    def items(self) -> int:
        return self.entries * self.group

    @property
    def prompt_pages(self) -> int:
        return -(-self.prompt_len // self.page_size)

    @property
    def own_max(self) -> int:  # token L-1 is never fed, so L-1 tokens at most in the cache
        return -(-(self.length - 1) // self.page_size)

    @property
    def max_pages(self) -> int:
        return self.prompt_pages + max(self.own_max, 1)

    @property
    def num_pages(self) -> int:  # every entry's prompt pages plus every slot's worst case: never dry
        return self.entries * self.prompt_pages + self.slots * self.own_max


def init_state(
    geom: Geometry, model_config: ModelConfig, payload_shapes: dict | None = None, key_template=None
) -> EngineState:
    """An engine with no groups: every entry free, every slot idle, every page in the pool.
    `payload_shapes`: {name: jax.ShapeDtypeStruct of one group's entry}, carried with each group;
    `key_template`: a typed key of the PRNG implementation the rows' keys will have."""
    q, nq, s, length = geom.entries, geom.items, geom.slots, geom.length
    prompt_pad = geom.prompt_pages * geom.page_size
    zero = jnp.asarray(0, jnp.int32)
    zeros = jnp.zeros((nq, length), jnp.float32)
    template = jax.random.key(0) if key_template is None else key_template
    return EngineState(
        pending=jnp.zeros((q,), bool),
        refcount=jnp.zeros((q,), jnp.int32),
        seq=jnp.zeros((q,), jnp.int32),
        next_seq=zero,
        prompt_table=jnp.full((q, geom.max_pages), geom.num_pages, jnp.int32),
        prompt_valid=jnp.zeros((q, prompt_pad), bool),
        prompt_lengths=jnp.zeros((q,), jnp.int32),
        prompt_logits=jnp.zeros((q, geom.vocab), jnp.float32),
        prompt_version=jnp.zeros((q,), jnp.int32),
        payload={k: jnp.zeros((q, *v.shape), v.dtype) for k, v in (payload_shapes or {}).items()},
        row_keys=jax.random.split(template, nq),
        queue=jnp.zeros((nq,), jnp.int32),
        queue_head=zero,
        queue_len=zero,
        item=jnp.full((s,), nq, jnp.int32),
        t=jnp.zeros((s,), jnp.int32),
        logits=jnp.zeros((s, geom.vocab), jnp.float32),
        logits_version=jnp.zeros((s,), jnp.int32),
        own_pages=jnp.zeros((s,), jnp.int32),
        page_table=jnp.full((s, geom.max_pages), geom.num_pages, jnp.int32),
        pool=paged_cache.pool_with_free(geom.num_pages, 0),
        pages=paged_cache.init_pages(model_config, geom.num_pages, geom.page_size),
        tokens=jnp.full((nq, length), geom.pad_id, jnp.int32),
        logprobs=zeros,
        sampling_logprobs=zeros,
        mask=jnp.zeros((nq, length), jnp.int32),
        version=jnp.zeros((nq, length), jnp.int32),
        lengths=jnp.zeros((nq,), jnp.int32),
        truncated=jnp.zeros((nq,), bool),
        iterations=zero,
        peak_in_use=zero,
        page_errors=zero,
        underflows=zero,
        pages_taken=zero,
        dropped=zero,
    )


def enqueue(
    geom: Geometry,
    model_config: ModelConfig,
    params,
    st: EngineState,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    row_keys: jax.Array,
    valid: jax.Array,
    version,
    payload: dict | None = None,
    constrain_pages=lambda pages: pages,
) -> EngineState:
    """Admit Bn new groups: the valid prompts [Bn, P] take the lowest free entries in order, each its
    prompt's pages from the pool, filled by one prefill under `params` (policy `version`); their G·Bn
    items join the queue's tail in row order. row_keys [Bn·G]: the new rows' streams; valid [Bn] bool;
    payload {name: [Bn, ...]} for the entries' `payload` arrays."""
    bn = prompt_tokens.shape[0]
    g, pp, nq = geom.group, geom.prompt_pages, geom.items
    prompt_pad = pp * geom.page_size
    prompt_mask = prompt_mask.astype(jnp.int32)
    extra = prompt_pad - geom.prompt_len
    padded_tokens = jnp.pad(prompt_tokens, ((0, 0), (extra, 0)), constant_values=geom.pad_id)
    padded_mask = jnp.pad(prompt_mask, ((0, 0), (extra, 0)))
    logits, cache = forward_with_cache(
        model_config,
        params,
        padded_tokens,
        positions_from_mask(padded_mask),
        init_cache(model_config, bn, prompt_pad),
        0,
        padded_mask,
        last_only=True,
    )
    # The i-th valid prompt takes the i-th free entry (none left: dropped, and counted).
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    free_entries = jnp.nonzero(~st.pending, size=bn, fill_value=geom.entries)[0]
    entry = jnp.where(valid, free_entries[jnp.clip(rank, 0, bn - 1)], geom.entries)  # [Bn]
    ok = entry < geom.entries
    at = jnp.where(ok, entry, geom.entries)  # out of range: dropped
    pool, page_ids = paged_cache.pop_pages(st.pool, jnp.repeat(ok, pp))  # [Bn·pp], in order
    page_ids = page_ids.reshape(bn, pp)
    scratch = geom.num_pages
    table = jnp.concatenate([page_ids, jnp.full((bn, geom.max_pages - pp), scratch, jnp.int32)], axis=1)
    write_ids = jnp.where(ok[:, None], page_ids, scratch + 1).reshape(-1)  # scratch + 1: dropped
    pages = {
        name: st.pages[name]
        .at[:, write_ids]
        .set(
            c.reshape(model_config.num_layers, bn * pp, geom.page_size, *c.shape[3:]).astype(
                st.pages[name].dtype
            ),
            mode="drop",
        )
        for name, c in cache.items()
    }
    # Its items, in row order, at the queue's tail; their output rows cleared.
    items = (entry[:, None] * g + jnp.arange(g)).reshape(-1)  # [Bn·G]
    item_ok = jnp.repeat(ok, g)
    item_rank = jnp.cumsum(item_ok.astype(jnp.int32)) - 1
    queue_at = jnp.where(item_ok, (st.queue_head + st.queue_len + item_rank) % nq, nq)
    rows = jnp.where(item_ok, items, nq)
    clear = lambda buf, value: buf.at[rows].set(value, mode="drop")  # noqa: E731
    version = jnp.asarray(version, jnp.int32)
    payload = payload or {}
    in_use = geom.num_pages - pool.free_count
    return st.replace(
        pending=st.pending.at[at].set(True, mode="drop"),
        refcount=st.refcount.at[at].set(g, mode="drop"),
        seq=st.seq.at[at].set(st.next_seq + rank, mode="drop"),
        next_seq=st.next_seq + jnp.sum(ok, dtype=jnp.int32),
        prompt_table=st.prompt_table.at[at].set(table, mode="drop"),
        prompt_valid=st.prompt_valid.at[at].set(padded_mask > 0, mode="drop"),
        prompt_lengths=st.prompt_lengths.at[at].set(jnp.sum(prompt_mask, axis=-1), mode="drop"),
        prompt_logits=st.prompt_logits.at[at].set(logits[:, -1], mode="drop"),
        prompt_version=st.prompt_version.at[at].set(version, mode="drop"),
        payload={k: v.at[at].set(payload[k].astype(v.dtype), mode="drop") for k, v in st.payload.items()},
        row_keys=st.row_keys.at[rows].set(row_keys, mode="drop"),
        queue=st.queue.at[queue_at].set(items, mode="drop"),
        queue_len=st.queue_len + jnp.sum(item_ok, dtype=jnp.int32),
        pool=pool,
        pages=constrain_pages(pages),
        tokens=clear(st.tokens, geom.pad_id),
        logprobs=clear(st.logprobs, 0.0),
        sampling_logprobs=clear(st.sampling_logprobs, 0.0),
        mask=clear(st.mask, 0),
        version=clear(st.version, 0),
        lengths=clear(st.lengths, 0),
        truncated=clear(st.truncated, False),
        peak_in_use=jnp.maximum(st.peak_in_use, in_use),
        underflows=st.underflows + (pool.free_count < 0),
        dropped=st.dropped + jnp.sum(valid & ~ok, dtype=jnp.int32),
    )


def complete_groups(st: EngineState) -> jax.Array:
    """[Q] bool: entries whose G samples are all finished and that are not handed out yet."""
    return st.pending & (st.refcount == 0)


def advance(
    geom: Geometry,
    model_config: ModelConfig,
    params,
    st: EngineState,
    *,
    budget,
    target,
    version,
    choose,
    stop_ids,
    check_pages: bool = False,
    constrain_slots=lambda x: x,
    constrain_pages=lambda pages: pages,
    vmap=None,
) -> EngineState:
    """Decode under `params` (policy `version`) until `target` groups are complete (those already waiting
    count), the queue is empty and every slot idle, or `budget` iterations have run, whichever comes
    first (the iterations are the module docstring's (1)-(4)). Slots still live at the end keep their
    item, logits and pages, so the next call continues them where they stopped. `choose`:
    `token_chooser(...)`; `check_pages` counts page-ownership errors every iteration.

    `vmap` (e.g. `functools.partial(jax.vmap, spmd_axis_name=...)`): `st` holds one sub-engine per data
    shard on a leading axis; each iteration runs on all of them as one vmapped step, and the loop goes on
    while any shard has work and fewer than `target` complete groups (a shard that is done decodes on
    while the others finish). The condition is not batched, so the loop carries no per-shard select of
    the whole state (pages included) every iteration, as a vmapped `while_loop` would."""
    g, q, nq, s, length = geom.group, geom.entries, geom.items, geom.slots, geom.length
    page_size, prompt_pages, max_pages = geom.page_size, geom.prompt_pages, geom.max_pages
    num_pages = scratch = geom.num_pages
    version = jnp.asarray(version, jnp.int32)
    stop_ids_arr = jnp.asarray(stop_ids, jnp.int32)
    slots = jnp.arange(s)
    own_columns = jnp.arange(max_pages - prompt_pages)
    completion_slots = jnp.arange((max_pages - prompt_pages) * page_size)

    def held_pages(st: EngineState):
        """Pages owned by live samples (their own) and by groups with unfinished samples (their prompt's)."""
        live = st.item < nq
        own = st.page_table[:, prompt_pages:]
        own_valid = live[:, None] & (own_columns[None, :] < st.own_pages[:, None])
        prompt = st.prompt_table[:, :prompt_pages]
        prompt_valid = jnp.broadcast_to((st.refcount > 0)[:, None], prompt.shape)
        held = jnp.concatenate([own.reshape(-1), prompt.reshape(-1)])
        return held, jnp.concatenate([own_valid.reshape(-1), prompt_valid.reshape(-1)])

    def iteration(st):
        # 1. Admit: idle slots take the next queued items, in queue order.
        idle = st.item == nq
        rank = jnp.cumsum(idle.astype(jnp.int32)) - 1
        admit = idle & (rank < st.queue_len)
        candidate = st.queue[(st.queue_head + rank) % nq]
        item = jnp.where(admit, candidate, st.item)
        entry = jnp.minimum(item, nq - 1) // g
        t = jnp.where(admit, 0, st.t)
        logits = jnp.where(admit[:, None], st.prompt_logits[entry], st.logits)
        logits_version = jnp.where(admit, st.prompt_version[entry], st.logits_version)
        page_table = jnp.where(admit[:, None], st.prompt_table[entry], st.page_table)
        live = item < nq

        # 2. Draw token t of every live slot from its row's stream at its own index t.
        token, logp, sampling_logp = choose(logits, st.row_keys[jnp.minimum(item, nq - 1)], t)
        token = jnp.where(live, token, geom.pad_id)
        row = jnp.where(live, item, nq)  # nq: dropped
        put = lambda buf, value: buf.at[row, t].set(value, mode="drop")  # noqa: E731
        tokens = put(st.tokens, token)
        logprobs = put(st.logprobs, logp)
        sampling_logprobs = put(st.sampling_logprobs, sampling_logp)
        mask = put(st.mask, jnp.ones_like(token))
        token_version = put(st.version, logits_version)
        stopped = live & jnp.isin(token, stop_ids_arr)
        t = t + live
        done = live & (stopped | (t >= length))

        # 3. Retire: outputs of finished rows, their pages (and their prompt's, once all G are done) freed.
        finished = jnp.where(done, item, nq)
        lengths = st.lengths.at[finished].set(t, mode="drop")
        truncated = st.truncated.at[finished].set(~stopped, mode="drop")
        refcount = st.refcount.at[jnp.where(done, entry, q)].add(-1, mode="drop")
        prompt_freed = (refcount == 0) & (st.refcount > 0)
        own = page_table[:, prompt_pages:]
        own_freed = done[:, None] & (own_columns[None, :] < st.own_pages[:, None])
        prompt = st.prompt_table[:, :prompt_pages]
        prompt_freed = jnp.broadcast_to(prompt_freed[:, None], prompt.shape)
        pool = paged_cache.push_pages(
            st.pool,
            jnp.concatenate([own.reshape(-1), prompt.reshape(-1)]),
            jnp.concatenate([own_freed.reshape(-1), prompt_freed.reshape(-1)]),
        )
        item = jnp.where(done, nq, item)
        own_pages = jnp.where(done, 0, st.own_pages)
        page_table = jnp.where(done[:, None], scratch, page_table)
        live = item < nq

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
            jnp.concatenate([st.prompt_valid[entry], completion_slots[None, :] <= c[:, None]], axis=1)
            & live[:, None]
        )
        logits, pages = paged_cache.decode_step(
            model_config,
            params,
            token,
            st.prompt_lengths[entry] + c,
            st.pages,
            page_table,
            kv_valid,
            write_page,
            jnp.where(live, c % page_size, 0),
        )
        admitted = jnp.sum(admit, dtype=jnp.int32)
        new = st.replace(
            queue_head=(st.queue_head + admitted) % nq,
            queue_len=st.queue_len - admitted,
            item=constrain_slots(item),
            t=constrain_slots(t),
            logits=constrain_slots(logits),
            logits_version=jnp.where(live, version, logits_version),
            own_pages=own_pages,
            page_table=constrain_slots(page_table),
            refcount=refcount,
            pool=pool,
            pages=constrain_pages(pages),
            tokens=constrain_slots(tokens),
            logprobs=constrain_slots(logprobs),
            sampling_logprobs=constrain_slots(sampling_logprobs),
            mask=constrain_slots(mask),
            version=constrain_slots(token_version),
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
            orphans = (new.item < nq) & (new.refcount[jnp.minimum(new.item, nq - 1) // g] <= 0)
            errors = jnp.sum(counts != 1, dtype=jnp.int32) + jnp.sum(orphans, dtype=jnp.int32)
            new = new.replace(page_errors=new.page_errors + errors)
        return new

    def wants_more(st):
        work = (st.queue_len > 0) | jnp.any(st.item < nq)
        return work & (jnp.sum(complete_groups(st), dtype=jnp.int32) < target)

    if vmap is not None:
        iteration, shard_wants_more = vmap(iteration), vmap(wants_more)
        wants_more = lambda st: jnp.any(shard_wants_more(st))  # noqa: E731

    def cond(carry):
        st, used = carry
        return wants_more(st) & (used < budget)

    def body(carry):
        st, used = carry
        return iteration(st), used + 1

    st, _ = jax.lax.while_loop(cond, body, (st, jnp.asarray(0, jnp.int32)))
    return st


def token_chooser(**settings):
    """`sampling.choose_tokens` with the sampling settings bound: (logits [S, V], row keys [S], t [S]) ->
    (token, logprob, sampling_logprob)."""
    return functools.partial(sampling.choose_tokens, **settings)


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
    vmap=None,
):
    """One engine over B prompts (one data shard's, or all of them) with its own slots, queue and page
    pool: row_keys [B·G] are its rows' streams. One entry per prompt, all enqueued at once and decoded
    to the end (no budget), so entry b is prompt b and the output rows are the items in order.
    -> (Rollout fields of its rows, EngineStats). `vmap`: the inputs hold D shards' on a leading axis,
    each an engine of its own (see `advance`), and so do the results.
    """
    batch, prompt_len = prompt_tokens.shape[-2:]
    each = vmap or (lambda f: f)
    geom = Geometry(
        entries=batch,
        group=num_samples,
        slots=num_slots,
        prompt_len=prompt_len,
        length=max_new_tokens,
        page_size=page_size,
        vocab=model_config.vocab_size,
        pad_id=pad_id,
    )
    everything = jnp.ones((batch,), bool)

    def start(tokens, mask, keys):
        st = init_state(geom, model_config, key_template=keys[0])
        return enqueue(
            geom, model_config, params, st, tokens, mask, keys, everything, 0, constrain_pages=constrain_pages
        )

    st = each(start)(prompt_tokens, prompt_mask, row_keys)
    choose = token_chooser(
        stop_ids=stop_ids, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    st = advance(
        geom,
        model_config,
        params,
        st,
        budget=jnp.iinfo(jnp.int32).max,
        target=batch,
        version=0,
        choose=choose,
        stop_ids=stop_ids,
        check_pages=check_pages,
        constrain_slots=constrain_slots,
        constrain_pages=constrain_pages,
        vmap=vmap,
    )
    outputs = {
        name: getattr(st, name)
        for name in ("tokens", "logprobs", "sampling_logprobs", "mask", "lengths", "truncated")
    }
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
        )
    )(st)
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
            outputs, stats = run(
                split(prompt_tokens),
                split(prompt_mask),
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
