"""The rollout engine's state machine: group entries, a work queue, decode slots and a paged KV cache,
as pure functions over an `EngineState` (`grpo_jax.rollout.engine` runs them as one program for a
one-shot `generate`; `partial` carries the state across training steps; `turns` answers paused rows).

How it runs, in one jitted program, as pure functions over an `EngineState` of Q group entries (a
one-shot `generate`: Q = B, one entry per prompt; partial rollouts, `grpo_jax.rollout.partial`, carry the
state from one training step to the next):

- `prefill` (once per distinct prompt, the static sampler's prefill, on the mesh's layout), then
  `enqueue`: each new prompt takes a free entry and P_pages = ceil(P / page_size) pages of the pool, into
  which its real tokens' keys are written left-justified (sequence index = position). Token 0 of each of
  its G rows is drawn from the prompt's last logits right away (`sampling.choose_tokens` at index 0);
  rows that stop there are done, the others join the work queue (a ring) in row order (item q·G + j is
  sample j of entry q), and the entry keeps a refcount of them.
- `advance`, continuous batching (Orca; Yu et al., OSDI 2022): S slots decode together in one
  `lax.while_loop`. Idle slots first take queued items; then each iteration (1) feeds every live slot's
  last token through the model (`paged_cache.decode_step`), taking a page from the pool when the token
  starts one; (2) draws token t of every live slot from `fold_in(row key, t)`, t being the row's own token
  index, and writes it to the row; (3) retires the slots whose row stopped (stop token or L): length and
  `truncated` written, its own pages pushed back to the pool, its entry's refcount decremented and the
  prompt's pages pushed back at 0; (4) gives every idle slot the next queued item (page table = its
  prompt's full pages, its token 0 already drawn), so a slot freed in an iteration decodes again in the
  next one. The loop ends when the queue is empty and every slot idle, or (partial rollouts) when
  `target` groups are complete or `budget` iterations have run; slots still live then keep their item,
  last token and pages.
- Turns (multi-turn tool use, `grpo_jax.rollout.turns`): a row that draws one of `pause_ids` (the end
  of a tool call) is paused, not finished: its slot keeps its item, pages and last token and decodes no
  more until the host answers. `resume` gives a paused slot the observation's tokens (at most
  `Geometry.observation_len`), which the next iterations feed one per iteration instead of drawing
  (teacher-forced: their keys go into the slot's pages by the same decode step, so earlier turns are
  never recomputed); then drawing resumes from the logits after the observation. Observation tokens are
  part of the row (`mask` 1, positions continue) but not the policy's (`generated` 0, logprobs 0: the
  loss mask). A row whose pause would exceed `max_turns` turns ends there (truncated).
- Every token also records the policy version whose forward made the logits it was drawn from
  (`EngineState.version`; token 0: the prefill's): the behaviour policy of decoupled PPO when params
  change between calls.
- Paged KV cache (PagedAttention; Kwon et al., SOSP 2023, arXiv 2309.06180): `grpo_jax.rollout.paged_cache`,
  pages `[kv_heads, layers · (num_pages + 1), page_size, head_dim]` as the Pallas TPU paged-attention
  kernel reads them. A slot's valid keys are exactly the prefix [0, length) of its page table (the
  kernel's contract): its prompt's full pages (shared by the group), then its own pages, the first of
  which is a copy of the prompt's partly filled last page made when the row feeds its first token
  (copy-on-write). The pool holds Q·P_pages prompt pages plus S·own_max pages for the slots' own
  (`pool_geometry`: a slot's worst case), so it never runs dry; the pages in use at any time follow the
  tokens really held (`EngineStats.peak_pages_in_use`).
- Decode attention: `paged_cache.paged_attention_reference` (plain XLA) or, with
  `ModelConfig.attention_impl == "splash"`, the Pallas paged-attention kernel on TPU
  (`paged_cache.paged_attention_kernel`; interpret mode with `attention_interpret`).
- Decode layout (`decode_params`, on by default): before the loop the policy is cast to the compute
  dtype, placed over `tensor` only and unstacked per layer, once per rollout; the loop reads it in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.models import ModelConfig, forward_with_cache, init_cache, positions_from_mask
from grpo_jax.models.attention import check_platform
from grpo_jax.rollout import paged_cache
from grpo_jax.rollout.engine_state import EngineState, Geometry

PartitionSpec = jax.sharding.PartitionSpec


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

    def constrain_pages(pages):  # [kv_heads, layers * pages, page_size, head_dim]
        tensor = mesh.shape["tensor"]
        return jax.tree_util.tree_map(
            lambda p: pin(p, ("tensor" if p.shape[0] % tensor == 0 else None, None, None, None)), pages
        )

    if sharded:
        return (lambda x: pin(x, (None,) * x.ndim)), constrain_pages
    return (lambda x: sampling._constrain_rows(x, mesh, 0)), constrain_pages


# ------------------------------------------------------------------------------------------------
# One engine
# ------------------------------------------------------------------------------------------------


def prefill(model_config: ModelConfig, params, prompt_tokens, prompt_mask):
    """Each distinct prompt once, the static sampler's prefill: prompt_tokens/mask [B, P] (left-padded) ->
    (last logits [B, V] float32: token 0 of each of its samples; cache {"k", "v"} [layers, B, P, K, Dh])."""
    batch, prompt_len = prompt_tokens.shape
    logits, cache = forward_with_cache(
        model_config,
        params,
        prompt_tokens,
        positions_from_mask(prompt_mask),
        init_cache(model_config, batch, prompt_len),
        0,
        prompt_mask,
        last_only=True,
    )
    return logits[:, -1], cache


def enqueue(
    geom: Geometry,
    model_config: ModelConfig,
    st: EngineState,
    prompt_mask: jax.Array,
    prompt_logits: jax.Array,
    cache: dict,
    row_keys: jax.Array,
    valid: jax.Array,
    version,
    *,
    choose,
    stop_ids,
    pause_ids=(),
    max_turns: int = 0,
    payload: dict | None = None,
    constrain_pages=lambda pages: pages,
) -> EngineState:
    """Admit Bn new groups from their prefill (`prefill`: prompt_logits [Bn, V], cache {"k", "v"} [layers,
    Bn, P, K, Dh], made under policy `version`): the valid prompts take the lowest free entries in order,
    each PP pages from the pool into which its prompt's keys are written left-justified (sequence index =
    position). Token 0 of each of its G rows is drawn here from the prompt's logits (version `version`);
    rows that stop there are done, the others join the queue's tail in row order (a group all of whose
    rows stopped is complete at once and its pages go back). row_keys [Bn·G]: the new rows' streams;
    valid [Bn] bool; payload {name: [Bn, ...]} for the entries' `payload` arrays. A token 0 in
    `pause_ids` pauses its row when it is admitted (or ends it, truncated, with `max_turns` = 1)."""
    bn, prompt_len = prompt_mask.shape
    g, pp, nq, ps = geom.group, geom.prompt_pages, geom.items, geom.page_size
    num_layers, kv_heads, head_dim = (
        model_config.num_layers,
        model_config.num_kv_heads,
        model_config.resolved_head_dim,
    )
    scratch = geom.num_pages
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)  # [Bn]
    version = jnp.asarray(version, jnp.int32)

    # The i-th valid prompt takes the i-th free entry (none left: dropped, and counted).
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    free_entries = jnp.nonzero(~st.pending, size=bn, fill_value=geom.entries)[0]
    entry = jnp.where(valid, free_entries[jnp.clip(rank, 0, bn - 1)], geom.entries)  # [Bn]
    ok = entry < geom.entries
    at = jnp.where(ok, entry, geom.entries)  # out of range: dropped
    pool, page_ids = paged_cache.pop_pages(st.pool, jnp.repeat(ok, pp))  # [Bn·PP], in order
    page_ids = page_ids.reshape(bn, pp)
    in_use = geom.num_pages - pool.free_count

    # Its prompt's keys, moved to the front of its pages (sequence index = position 0 .. len − 1).
    index = jnp.arange(pp * ps)
    source = jnp.clip(index[None, :] + (prompt_len - prompt_lengths)[:, None], 0, prompt_len - 1)
    real = index[None, :] < prompt_lengths[:, None]  # [Bn, PP·ps]
    write_ids = jnp.where(ok[:, None], page_ids, scratch + 1).reshape(-1)  # scratch + 1: dropped

    def write(pages, c):  # c [layers, Bn, P, K, Dh] into pages [K, layers * (num_pages + 1), ps, Dh]
        c = c[:, jnp.arange(bn)[:, None], source]  # [layers, Bn, PP·ps, K, Dh], left-justified
        c = jnp.where(real[None, :, :, None, None], c, 0).astype(pages.dtype)
        c = c.reshape(num_layers, bn * pp, ps, kv_heads, head_dim).transpose(3, 0, 1, 2, 4)
        by_layer = pages.reshape(kv_heads, num_layers, scratch + 1, ps, head_dim)
        by_layer = by_layer.at[:, :, write_ids].set(c, mode="drop")
        return by_layer.reshape(pages.shape)

    pages = {name: write(st.pages[name], cache[name]) for name in st.pages}
    full_pages = prompt_lengths // ps  # pages full of prompt tokens: shared by the group
    columns = jnp.arange(geom.max_pages)
    padded_ids = jnp.pad(page_ids, ((0, 0), (0, geom.max_pages - pp)), constant_values=scratch)
    table = jnp.where(columns[None, :] < full_pages[:, None], padded_ids, scratch)  # [Bn, MP]

    # Token 0 of every row, from its prompt's logits (one prompt's G rows at a time).
    first = jax.lax.map(
        lambda a: choose(jnp.broadcast_to(a[0], (g, a[0].shape[-1])), a[1], jnp.zeros((g,), jnp.int32)),
        (prompt_logits, row_keys.reshape(bn, g)),
    )
    first_token, first_logp, first_sampling_logp = (x.reshape(bn * g) for x in first)
    first_stopped = jnp.isin(first_token, jnp.asarray(stop_ids, jnp.int32))
    first_pause = jnp.isin(first_token, jnp.asarray(pause_ids, jnp.int32))
    first_done = first_stopped | (geom.length <= 1) | (first_pause & (max_turns == 1))
    remaining = g - jnp.sum(first_done.reshape(bn, g), axis=1, dtype=jnp.int32)  # [Bn]

    # Its rows: outputs reset with token 0; those still to decode at the queue's tail, in row order.
    items = (entry[:, None] * g + jnp.arange(g)).reshape(-1)  # [Bn·G]
    item_ok = jnp.repeat(ok, g)
    rows = jnp.where(item_ok, items, nq)
    queued = item_ok & ~first_done
    item_rank = jnp.cumsum(queued.astype(jnp.int32)) - 1
    queue_at = jnp.where(queued, (st.queue_head + st.queue_len + item_rank) % nq, nq)

    def reset(buf, first_value, empty):  # a row's outputs: token 0 in column 0, the rest empty
        row = jnp.full((bn * g, geom.length), empty, buf.dtype).at[:, 0].set(first_value.astype(buf.dtype))
        return buf.at[rows].set(row, mode="drop")

    # A group all of whose rows stopped at token 0 is complete now: its prompt's pages go back.
    pool = paged_cache.push_pages(pool, page_ids.reshape(-1), jnp.repeat(ok & (remaining == 0), pp))
    payload = payload or {}
    return st.replace(
        pending=st.pending.at[at].set(True, mode="drop"),
        refcount=st.refcount.at[at].set(remaining, mode="drop"),
        seq=st.seq.at[at].set(st.next_seq + rank, mode="drop"),
        next_seq=st.next_seq + jnp.sum(ok, dtype=jnp.int32),
        prompt_pages=st.prompt_pages.at[at].set(page_ids, mode="drop"),
        prompt_table=st.prompt_table.at[at].set(table, mode="drop"),
        prompt_lengths=st.prompt_lengths.at[at].set(prompt_lengths, mode="drop"),
        payload={k: v.at[at].set(payload[k].astype(v.dtype), mode="drop") for k, v in st.payload.items()},
        row_keys=st.row_keys.at[rows].set(row_keys, mode="drop"),
        queue=st.queue.at[queue_at].set(items, mode="drop"),
        queue_len=st.queue_len + jnp.sum(queued, dtype=jnp.int32),
        pool=pool,
        pages=constrain_pages(pages),
        tokens=reset(st.tokens, first_token, geom.pad_id),
        logprobs=reset(st.logprobs, first_logp, 0.0),
        sampling_logprobs=reset(st.sampling_logprobs, first_sampling_logp, 0.0),
        mask=reset(st.mask, jnp.ones_like(first_token), 0),
        generated=reset(st.generated, jnp.ones_like(first_token), 0),
        turns=st.turns.at[rows].set(0, mode="drop"),
        version=reset(st.version, jnp.broadcast_to(version, first_token.shape), 0),
        lengths=st.lengths.at[rows].set(jnp.where(first_done, 1, 0), mode="drop"),
        truncated=st.truncated.at[rows].set(first_done & ~first_stopped, mode="drop"),
        peak_in_use=jnp.maximum(st.peak_in_use, in_use),
        underflows=st.underflows + (pool.free_count < 0),
        dropped=st.dropped + jnp.sum(valid & ~ok, dtype=jnp.int32),
    )


def complete_groups(st: EngineState) -> jax.Array:
    """[Q] bool: entries whose G samples are all finished and that are not handed out yet."""
    return st.pending & (st.refcount == 0)


def resume(
    geom: Geometry, st: EngineState, observations: jax.Array, lengths: jax.Array, end=None
) -> EngineState:
    """Answer the paused slots (module docstring, "Turns"): observations [S, O] int32, lengths [S] (the
    first lengths[s] tokens of row s are slot s's observation; clipped to O and to the room left in the
    row, L − t; 0: drawing resumes at once); end [S] bool (optional): the trajectory is over, the row
    finishes (not truncated) after its observation, with no token drawn. Slots not paused are
    unchanged."""
    go = st.paused & (st.item < geom.items)
    width = st.forced.shape[1]
    observations = jnp.asarray(observations, jnp.int32).reshape(st.forced.shape[0], -1)[:, :width]
    observations = jnp.pad(observations, ((0, 0), (0, width - observations.shape[1])))
    n = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, jnp.minimum(width, geom.length - st.t))
    return st.replace(
        paused=st.paused & ~go,
        forced=jnp.where(go[:, None], observations, st.forced),
        forced_len=jnp.where(go, n, st.forced_len),
        forced_at=jnp.where(go, 0, st.forced_at),
        forced_end=jnp.where(go, False if end is None else jnp.asarray(end, bool), st.forced_end),
    )


def advance(
    geom: Geometry,
    model_config: ModelConfig,
    loop_params,
    st: EngineState,
    *,
    budget,
    target,
    version,
    choose,
    stop_ids,
    pause_ids=(),
    max_turns: int = 0,
    check_pages: bool = False,
    kernel_mesh=None,
    constrain_slots=lambda x: x,
    constrain_pages=lambda pages: pages,
    vmap=None,
) -> EngineState:
    """Decode with `loop_params` (`decode_params` of policy `version`, or the params as given) until
    `target` groups are complete (those already waiting count), the queue is empty and every slot idle,
    or `budget` iterations have run, whichever comes first (the iterations are the module docstring's
    (1)-(4); idle slots first take queued items). Slots still live at the end keep their item, last
    token and pages, so the next call continues them where they stopped. `choose`: `token_chooser(...)`;
    `check_pages` counts page-ownership errors every iteration; `kernel_mesh`: the mesh the Pallas kernel
    runs under (`geom.attention == "pallas"`). `pause_ids`: tokens that end a turn (module docstring,
    "Turns"): the loop also ends when every slot with an item is paused and no idle slot can take queued
    work; `max_turns` (0: no limit): a row's pauses, the one that would exceed it ends the row instead.

    `vmap` (e.g. `functools.partial(jax.vmap, spmd_axis_name=...)`): `st` holds one sub-engine per data
    shard on a leading axis; each iteration runs on all of them as one vmapped step, and the loop goes on
    while any shard has work and fewer than `target` complete groups (a shard that is done decodes on
    while the others finish). The condition is not batched, so the loop carries no per-shard select of
    the whole state (pages included) every iteration, as a vmapped `while_loop` would."""
    g, q, nq, s, length = geom.group, geom.entries, geom.items, geom.slots, geom.length
    ps, max_pages, num_layers = geom.page_size, geom.max_pages, model_config.num_layers
    num_pages = scratch = geom.num_pages
    version = jnp.asarray(version, jnp.int32)
    stop_ids_arr = jnp.asarray(stop_ids, jnp.int32)
    pause_ids_arr = jnp.asarray(pause_ids, jnp.int32)
    turns_limit = max_turns if max_turns > 0 else jnp.iinfo(jnp.int32).max
    slots = jnp.arange(s)
    columns = jnp.arange(max_pages)

    def own_columns(st, own_pages):
        """[S, MP] bool: the columns of a slot's own pages (after its prompt's full pages)."""
        entry = jnp.minimum(st.item, nq - 1) // g
        first = st.prompt_lengths[entry] // ps
        return (columns[None, :] >= first[:, None]) & (columns[None, :] < (first + own_pages)[:, None])

    def held_pages(st: EngineState):
        """Pages owned by live samples (their own) and by groups with unfinished samples (their prompt's)."""
        live = st.item < nq
        own_valid = own_columns(st, st.own_pages) & live[:, None]
        prompt_valid = jnp.broadcast_to((st.refcount > 0)[:, None], st.prompt_pages.shape)
        held = jnp.concatenate([st.page_table.reshape(-1), st.prompt_pages.reshape(-1)])
        return held, jnp.concatenate([own_valid.reshape(-1), prompt_valid.reshape(-1)])

    def admit(st: EngineState) -> EngineState:
        """Idle slots take the next queued items, in queue order, their token 0 already drawn."""
        idle = st.item == nq
        rank = jnp.cumsum(idle.astype(jnp.int32)) - 1
        take = idle & (rank < st.queue_len)
        item = jnp.where(take, st.queue[(st.queue_head + rank) % nq], st.item)
        entry = jnp.minimum(item, nq - 1) // g
        taken = jnp.sum(take, dtype=jnp.int32)
        first = st.tokens[jnp.minimum(item, nq - 1), 0]
        first_pause = take & jnp.isin(first, pause_ids_arr)  # token 0 ended a turn (max_turns > 1)
        return st.replace(
            queue_head=(st.queue_head + taken) % nq,
            queue_len=st.queue_len - taken,
            item=constrain_slots(item),
            t=jnp.where(take, 1, st.t),
            token=jnp.where(take, first, st.token),
            paused=jnp.where(take, first_pause, st.paused),
            turns=st.turns.at[jnp.where(first_pause, item, nq)].add(1, mode="drop"),
            own_pages=jnp.where(take, 0, st.own_pages),
            page_table=constrain_slots(jnp.where(take[:, None], st.prompt_table[entry], st.page_table)),
        )

    def copies(st: EngineState) -> jax.Array:
        """[S] bool: live slots feeding their row's first token onto a partly filled prompt page."""
        live = (st.item < nq) & ~st.paused
        prompt_len = st.prompt_lengths[jnp.minimum(st.item, nq - 1) // g]
        return live & (st.t == 1) & (prompt_len % ps > 0)

    def iteration(st: EngineState, any_copy) -> EngineState:
        """One iteration; `any_copy` (unbatched: computed over every data shard) says whether some slot
        copies a page, so under `vmap` the copy stays a real `cond`, not a select of the whole pages array
        every iteration."""
        live = (st.item < nq) & ~st.paused
        item = jnp.minimum(st.item, nq - 1)
        entry = item // g

        # 1. Feed each live slot's last token (own index c = t - 1, sequence index = position = its
        # prompt's length + c) through the model. A token that starts a page takes one from the pool; a
        # row's first token on a partly filled prompt page takes a copy of that page (copy-on-write).
        prompt_len = st.prompt_lengths[entry]
        pos = prompt_len + st.t - 1
        copy = copies(st)
        need = live & ((pos % ps == 0) | copy)
        pool, new_page = paged_cache.pop_pages(st.pool, need)
        column = pos // ps
        page_table = st.page_table.at[slots, jnp.where(need, column, max_pages)].set(new_page, mode="drop")
        tail_page = st.prompt_pages[entry, jnp.minimum(prompt_len // ps, geom.prompt_pages - 1)]
        copy_src, copy_dst = jnp.where(copy, tail_page, scratch), jnp.where(copy, new_page, scratch)
        pages = jax.lax.cond(
            any_copy,
            lambda p: paged_cache.copy_pages(p, copy_src, copy_dst, num_pages, num_layers),
            lambda p: p,
            st.pages,
        )
        own_pages = st.own_pages + need
        write_page = jnp.where(live, page_table[slots, jnp.clip(column, 0, max_pages - 1)], scratch)
        logits, pages = paged_cache.decode_step(
            model_config,
            loop_params,
            st.token,
            pos,
            pages,
            page_table,
            jnp.where(live, pos + 1, 1),  # idle slots: one key (the scratch page's first)
            write_page,
            jnp.where(live, pos % ps, 0),
            num_pages=num_pages,
            impl=geom.attention,
            mesh=kernel_mesh,
        )

        # 2. Draw token t of every live slot from its row's stream at its own index t (a slot feeding an
        # observation writes its next observation token instead, with logprobs 0 and loss mask 0).
        token, logp, sampling_logp = choose(logits, st.row_keys[item], st.t)
        forcing = live & (st.forced_at < st.forced_len)
        ending = live & st.forced_end & ~forcing  # the host ended it: nothing written, the slot retires
        forced_token = st.forced[slots, jnp.minimum(st.forced_at, st.forced.shape[1] - 1)]
        token = jnp.where(forcing, forced_token, token)
        logp, sampling_logp = jnp.where(forcing, 0.0, logp), jnp.where(forcing, 0.0, sampling_logp)
        token = jnp.where(live, token, geom.pad_id)
        row = jnp.where(live & ~ending, st.item, nq)  # nq: dropped
        put = lambda buf, value: buf.at[row, st.t].set(value, mode="drop")  # noqa: E731
        tokens = put(st.tokens, token)
        logprobs = put(st.logprobs, logp)
        sampling_logprobs = put(st.sampling_logprobs, sampling_logp)
        mask = put(st.mask, jnp.ones_like(token))
        generated = put(st.generated, (~forcing).astype(jnp.int32))
        token_version = put(st.version, jnp.broadcast_to(version, token.shape))
        drawn = live & ~forcing & ~ending
        stopped = drawn & jnp.isin(token, stop_ids_arr)
        pause_hit = drawn & jnp.isin(token, pause_ids_arr)
        over_turns = pause_hit & (st.turns[item] + 1 >= turns_limit)
        t = st.t + (live & ~ending)
        done = live & (stopped | over_turns | ending | (t >= length))
        pause = pause_hit & ~done

        # 3. Retire: outputs of finished rows, their pages (and their prompt's, once all G are done) freed.
        finished = jnp.where(done, st.item, nq)
        lengths = st.lengths.at[finished].set(t, mode="drop")
        truncated = st.truncated.at[finished].set(~(stopped | ending), mode="drop")
        refcount = st.refcount.at[jnp.where(done, entry, q)].add(-1, mode="drop")
        prompt_freed = (refcount == 0) & (st.refcount > 0)
        own_freed = own_columns(st, own_pages) & done[:, None]
        in_use = num_pages - pool.free_count  # after this step's pops, before its returns: the peak
        pool = paged_cache.push_pages(
            pool,
            jnp.concatenate([page_table.reshape(-1), st.prompt_pages.reshape(-1)]),
            jnp.concatenate(
                [
                    own_freed.reshape(-1),
                    jnp.broadcast_to(prompt_freed[:, None], st.prompt_pages.shape).reshape(-1),
                ]
            ),
        )
        new = st.replace(
            item=jnp.where(done, nq, st.item),
            t=constrain_slots(t),
            token=constrain_slots(jnp.where(live, token, st.token)),  # paused: kept
            paused=st.paused | pause,
            forced_len=jnp.where(done, 0, st.forced_len),
            forced_at=jnp.where(done, 0, st.forced_at + forcing),
            forced_end=st.forced_end & ~done,
            turns=st.turns.at[jnp.where(pause, st.item, nq)].add(1, mode="drop"),
            own_pages=jnp.where(done, 0, own_pages),
            page_table=jnp.where(done[:, None], scratch, page_table),
            refcount=refcount,
            pool=pool,
            pages=constrain_pages(pages),
            tokens=constrain_slots(tokens),
            logprobs=constrain_slots(logprobs),
            sampling_logprobs=constrain_slots(sampling_logprobs),
            mask=constrain_slots(mask),
            generated=constrain_slots(generated),
            version=constrain_slots(token_version),
            lengths=lengths,
            truncated=truncated,
            iterations=st.iterations + 1,
            peak_in_use=jnp.maximum(st.peak_in_use, in_use),
            underflows=st.underflows + (in_use > num_pages),
            pages_taken=st.pages_taken + jnp.sum(need, dtype=jnp.int32),
        )
        # 4. Admit: the slots freed in 3 take the next items now, so they decode in the next iteration.
        new = admit(new)
        if check_pages:  # every page has exactly one owner: the pool, one live sample, or one live prompt;
            # and a live sample's prompt is live (its pages not returned while a sample reads them)
            counts = paged_cache.page_holders(new.pool, *held_pages(new))
            orphans = (new.item < nq) & (new.refcount[jnp.minimum(new.item, nq - 1) // g] <= 0)
            errors = jnp.sum(counts != 1, dtype=jnp.int32) + jnp.sum(orphans, dtype=jnp.int32)
            new = new.replace(page_errors=new.page_errors + errors)
        return new

    def wants_more(st):
        admissible = (st.queue_len > 0) & jnp.any(st.item == nq)
        work = admissible | jnp.any((st.item < nq) & ~st.paused)
        return work & (jnp.sum(complete_groups(st), dtype=jnp.int32) < target)

    admit_all, any_copy = admit, lambda st: jnp.any(copies(st))
    if vmap is not None:
        iteration, admit_all, shard_wants_more = (
            vmap(iteration, in_axes=(0, None)),
            vmap(admit),
            vmap(wants_more),
        )
        wants_more = lambda st: jnp.any(shard_wants_more(st))  # noqa: E731
        any_copy = lambda st: jnp.any(vmap(copies)(st))  # noqa: E731

    def cond(carry):
        st, used = carry
        return wants_more(st) & (used < budget)

    def body(carry):
        st, used = carry
        return iteration(st, any_copy(st)), used + 1

    st, _ = jax.lax.while_loop(cond, body, (admit_all(st), jnp.asarray(0, jnp.int32)))
    return st


def token_chooser(**settings):
    """`sampling.choose_tokens` with the sampling settings bound: (logits [S, V], row keys [S], t [S]) ->
    (token, logprob, sampling_logprob)."""
    return functools.partial(sampling.choose_tokens, **settings)


def paged_attention_of(model_config: ModelConfig) -> str:
    """The engine's decode attention for `model_config.attention_impl`: the Pallas paged kernel ("pallas")
    with "splash" (checked to run here, or interpreted), else the XLA reference ("xla")."""
    if model_config.attention_impl == "splash":
        check_platform("splash", interpret=model_config.attention_interpret)
        return "pallas"
    return "xla"
