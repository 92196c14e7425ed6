"""The rollout engine: continuous batching over a paged KV cache, each prompt's pages shared by its group.

Same contract and numbers as `grpo_jax.sampling.generate` (the static sampler, its reference): the same
arguments plus `num_slots` and `page_size`, the same `Rollout` (row b·G + j is sample j of prompt b), and
the same random stream per row, so the tokens are equal and the logprobs agree to float tolerance.

How it runs, in one jitted program:

- Prefill (once per distinct prompt, the static sampler's prefill, on the mesh's layout): each prompt's
  real tokens are then moved to the front of its cache (sequence index = position) and cut into
  P_pages = ceil(P / page_size) pages 0 .. B·P_pages − 1 of the pool. Token 0 of every row is drawn
  from its prompt's last logits right away (`sampling.choose_tokens` at index 0); rows that stop there
  are done, and a prompt keeps a refcount of its other rows.
- Work queue: the rows still to decode, in row order (row r is sample r % G of prompt r // G).
- Continuous batching (Orca; Yu et al., OSDI 2022): S slots decode together in one `lax.while_loop`. Each
  iteration (1) feeds every live slot's last token through the model (`paged_cache.decode_step`), taking
  a page from the pool when the token starts one; (2) draws token t of every live slot from
  `fold_in(row key, t)`, t being the row's own token index, and writes it to the row; (3) retires the
  slots whose row stopped (stop token or budget): length and `truncated` written, its own pages pushed
  back to the pool, its prompt's refcount decremented and the prompt's pages pushed back at 0; (4) gives
  every idle slot the next queued row (page table = its prompt's full pages, its token 0 already drawn),
  so a slot freed in an iteration decodes again in the next one. The loop ends when every slot is idle.
- Paged KV cache (PagedAttention; Kwon et al., SOSP 2023, arXiv 2309.06180): `grpo_jax.rollout.paged_cache`,
  pages `[kv_heads, layers · (num_pages + 1), page_size, head_dim]` as the Pallas TPU paged-attention
  kernel reads them. A slot's valid keys are exactly the prefix [0, length) of its page table (the
  kernel's contract): its prompt's full pages (shared by the group), then its own pages, the first of
  which is a copy of the prompt's partly filled last page made when the row feeds its first token
  (copy-on-write). The pool holds B·P_pages prompt pages plus S·own_max pages for the slots' own
  (`pool_geometry`: a slot's worst case), so it never runs dry; the pages in use at any time follow the
  tokens really held (`EngineStats.peak_pages_in_use`).
- Decode attention: `paged_cache.paged_attention_reference` (plain XLA) or, with
  `ModelConfig.attention_impl == "splash"`, the Pallas paged-attention kernel on TPU
  (`paged_cache.paged_attention_kernel`; interpret mode with `attention_interpret`).
- Decode layout (`decode_params`, on by default): before the loop the policy is cast to the compute
  dtype, placed over `tensor` only and unstacked per layer, once per rollout; the loop reads it in place.

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
from grpo_jax.models import (
    ModelConfig,
    activation_sharding,
    forward_with_cache,
    init_cache,
    logical_axes,
    param_shapes,
    positions_from_mask,
)
from grpo_jax.models.attention import check_platform
from grpo_jax.rollout import paged_cache
from grpo_jax.sharding import BATCH_AXES, DEFAULT_RULES, data_parallel_size, logical_to_spec

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


@flax.struct.dataclass
class EngineState:
    """The loop state. S slots, N = B·G items, L = max_new_tokens, MP pages per slot's sequence."""

    next_item: jax.Array  # [] the queue's head
    item: jax.Array  # [S] the item a slot decodes (N: idle)
    t: jax.Array  # [S] tokens drawn so far for it (the row's own token index of the next draw)
    token: jax.Array  # [S] its last drawn token (index t - 1), fed at the next decode step
    own_pages: jax.Array  # [S] pages of its own it holds (its prompt tail's copy and its tokens')
    page_table: jax.Array  # [S, MP] its prompt's full pages, then its own (scratch where unused)
    refcount: jax.Array  # [B] a prompt's samples not finished yet
    pool: paged_cache.PagePool
    pages: dict  # {"k", "v"} [kv_heads, layers * (num_pages + 1), page_size, head_dim]
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

    def constrain_pages(pages):  # [kv_heads, layers * pages, page_size, head_dim]
        tensor = mesh.shape["tensor"]
        return jax.tree_util.tree_map(
            lambda p: pin(p, ("tensor" if p.shape[0] % tensor == 0 else None, None, None, None)), pages
        )

    if sharded:
        return (lambda x: pin(x, (None,) * x.ndim)), constrain_pages
    return (lambda x: sampling._constrain_rows(x, mesh, 0)), constrain_pages


# ------------------------------------------------------------------------------------------------
# The decode layout: weights cast and placed once per rollout
# ------------------------------------------------------------------------------------------------

# The training rules without the fsdp split: decode weights over `tensor` only, whole on every row shard.
DECODE_RULES = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)


def decode_specs(model_config: ModelConfig, mesh) -> dict:
    """The PartitionSpec of every model weight in the decode layout (`decode_params`' tree, without LoRA
    adapters): `DECODE_RULES` over each weight's logical axes, the layer stack as a tuple of layers."""
    axes, shapes = logical_axes(model_config), param_shapes(model_config)
    spec = lambda logical, shape: logical_to_spec(logical, shape, mesh, DECODE_RULES)  # noqa: E731
    out = {name: spec(axes[name], shapes[name]) for name in axes if name != "layers"}
    layer = {name: spec(axes["layers"][name][1:], shape[1:]) for name, shape in shapes["layers"].items()}
    out["layers"] = tuple(dict(layer) for _ in range(model_config.num_layers))
    return out


def decode_params(model_config: ModelConfig, params, mesh=None):
    """The policy in the decode layout (traceable; the engine calls it once per rollout, before its loop):
    every float leaf cast to the compute dtype; on a mesh, every model weight constrained to `DECODE_RULES`
    (`decode_specs`: its fsdp split gathered once, `tensor` kept; the loop then reads each weight where it
    lies instead of casting and all-gathering every layer at every token); and the layer stack unstacked
    into a tuple of per-layer weights, so the decode step's unrolled layers read them in place (a scan
    copies each layer's slice out of the stacked params at every step). LoRA adapters under `layers/lora`
    are cast and unstacked, not placed."""
    dtype = model_config.compute_dtype
    specs = None if mesh is None else decode_specs(model_config, mesh)

    def place(x, spec):
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        if spec is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    top = {
        name: jax.tree_util.tree_map(lambda a, name=name: place(a, specs and specs.get(name)), value)
        for name, value in params.items()
        if name != "layers"
    }

    def layer(i):
        spec = lambda name: None if specs is None or name == "lora" else specs["layers"][i][name]  # noqa: E731
        return {
            name: jax.tree_util.tree_map(lambda a, name=name: place(a[i], spec(name)), value)
            for name, value in params["layers"].items()
        }

    return dict(top, layers=tuple(layer(i) for i in range(model_config.num_layers)))


# ------------------------------------------------------------------------------------------------
# One engine
# ------------------------------------------------------------------------------------------------


def pool_geometry(
    batch: int, prompt_len: int, max_new_tokens: int, *, page_size: int, slots: int, attention="xla"
):
    """The static sizes of one engine's pool: `prompt_pages` per prompt (ceil(P / page_size)); `own_max`,
    a slot's worst case of pages of its own (its prompt's partly filled last page, copied, holds up to
    page_size - 1 prompt tokens, then its L - 1 fed tokens: token L - 1 is never fed); `max_pages`, the
    page-table width (a sequence holds P + L - 1 keys at most; for the Pallas kernel a multiple of its
    block of pages); `num_pages` = B · prompt_pages + S · own_max (never runs dry)."""
    ps = page_size
    prompt_pages = -(-prompt_len // ps)
    own_max = max(-(-(min(ps - 1, prompt_len) + max_new_tokens - 1) // ps), 1)
    max_pages = max(-(-(prompt_len + max_new_tokens - 1) // ps), prompt_pages)
    if attention == "pallas":  # the kernel's blocks of pages divide the table
        block = max(1, min(max_pages, paged_cache.KERNEL_BLOCK_TOKENS // ps))
        max_pages = -(-max_pages // block) * block
    return dict(
        prompt_pages=prompt_pages,
        own_max=own_max,
        max_pages=max_pages,
        num_pages=batch * prompt_pages + slots * own_max,
    )


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
):
    """One engine over B prompts (one data shard's, or all of them) with its own slots, queue and page
    pool: prompt_logits [B, V] and cache {"k", "v"} [layers, B, P, K, Dh] are its prompts' prefill, row_keys
    [B·G] its rows' streams; `loop_params` (the decode layout, or the params as given) decode.
    -> (Rollout fields of its rows, EngineStats)."""
    batch, prompt_len = prompt_mask.shape
    g, length, ps = num_samples, max_new_tokens, page_size
    n, s = batch * g, num_slots
    num_layers, kv_heads, head_dim = (
        model_config.num_layers,
        model_config.num_kv_heads,
        model_config.resolved_head_dim,
    )
    prompt_mask = prompt_mask.astype(jnp.int32)
    geometry = pool_geometry(batch, prompt_len, length, page_size=ps, slots=s, attention=attention)
    prompt_pages, max_pages, num_pages = (
        geometry["prompt_pages"],
        geometry["max_pages"],
        geometry["num_pages"],
    )
    prompt_pad = prompt_pages * ps
    num_prompt_pages = batch * prompt_pages
    scratch = num_pages

    # Move each prompt's real tokens in its prefill cache to the front (sequence index = position:
    # 0 .. len - 1) and cut the cache into its pages.
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)  # [B]
    index = jnp.arange(prompt_pad)
    source = jnp.clip(index[None, :] + (prompt_len - prompt_lengths)[:, None], 0, prompt_len - 1)
    real = index[None, :] < prompt_lengths[:, None]  # [B, P_pad]

    def to_pages(c):  # [layers, B, P, K, Dh] -> [K, layers * (num_pages + 1), ps, Dh]
        c = c[:, jnp.arange(batch)[:, None], source]  # [layers, B, P_pad, K, Dh], left-justified
        c = jnp.where(real[None, :, :, None, None], c, 0)
        c = c.reshape(num_layers, num_prompt_pages, ps, kv_heads, head_dim).transpose(3, 0, 1, 2, 4)
        rest = jnp.zeros((kv_heads, num_layers, num_pages + 1 - num_prompt_pages, ps, head_dim), c.dtype)
        return jnp.concatenate([c, rest], axis=2).reshape(kv_heads, -1, ps, head_dim)

    pages = constrain_pages({name: to_pages(c) for name, c in cache.items()})
    prompt_page_ids = jnp.arange(num_prompt_pages, dtype=jnp.int32).reshape(batch, prompt_pages)
    full_pages = prompt_lengths // ps  # [B] pages full of prompt tokens: shared by the group
    tail = prompt_lengths % ps  # [B] prompt tokens on its partly filled last page: copied per sample
    tail_page = prompt_page_ids[jnp.arange(batch), jnp.minimum(full_pages, prompt_pages - 1)]
    columns = jnp.arange(max_pages)
    padded_ids = jnp.pad(prompt_page_ids, ((0, 0), (0, max_pages - prompt_pages)), constant_values=scratch)
    prompt_table = jnp.where(columns[None, :] < full_pages[:, None], padded_ids, scratch)  # [B, MP]

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

    # Token 0 of every row, from its prompt's logits (one prompt's G rows at a time): written before the
    # loop, so a slot is admitted with its first token drawn and feeds it at its first decode step.
    first = jax.lax.map(
        lambda a: choose(jnp.broadcast_to(a[0], (g, a[0].shape[-1])), a[1], 0),
        (prompt_logits, row_keys.reshape(batch, g)),
    )
    first_token, first_logp, first_sampling_logp = (x.reshape(n) for x in first)
    first_stopped = jnp.isin(first_token, stop_ids_arr)
    first_done = first_stopped | (length <= 1)
    queue = jnp.argsort(first_done, stable=True).astype(jnp.int32)  # rows still to decode, in row order
    queue_len = n - jnp.sum(first_done, dtype=jnp.int32)
    refcount = g - jnp.sum(first_done.reshape(batch, g), axis=1, dtype=jnp.int32)

    def own_columns(page_table_first, own_pages):
        """[S, MP] bool: the columns of a slot's own pages (after its prompt's full pages)."""
        return (columns[None, :] >= page_table_first[:, None]) & (
            columns[None, :] < (page_table_first + own_pages)[:, None]
        )

    def held_pages(st: EngineState):
        """Pages owned by live samples (their own) and by prompts with unfinished samples."""
        live = st.item < n
        prompt = jnp.minimum(st.item, n - 1) // g
        own_valid = own_columns(full_pages[prompt], st.own_pages) & live[:, None]
        prompt_valid = jnp.broadcast_to((st.refcount > 0)[:, None], prompt_page_ids.shape)
        held = jnp.concatenate([st.page_table.reshape(-1), prompt_page_ids.reshape(-1)])
        return held, jnp.concatenate([own_valid.reshape(-1), prompt_valid.reshape(-1)])

    def admit(st: EngineState) -> EngineState:
        """Idle slots take the next queued rows (row order), their token 0 already drawn."""
        idle = st.item == n
        rank = st.next_item + jnp.cumsum(idle.astype(jnp.int32)) - 1
        take = idle & (rank < queue_len)
        item = jnp.where(take, queue[jnp.clip(rank, 0, n - 1)], st.item)
        prompt = jnp.minimum(item, n - 1) // g
        return st.replace(
            next_item=st.next_item + jnp.sum(take, dtype=jnp.int32),
            item=constrain_slots(item),
            t=jnp.where(take, 1, st.t),
            token=jnp.where(take, first_token[jnp.minimum(item, n - 1)], st.token),
            own_pages=jnp.where(take, 0, st.own_pages),
            page_table=constrain_slots(jnp.where(take[:, None], prompt_table[prompt], st.page_table)),
        )

    def body(st: EngineState) -> EngineState:
        live = st.item < n
        item = jnp.minimum(st.item, n - 1)
        prompt = item // g

        # 1. Feed each live slot's last token (own index c = t - 1, sequence index = position = its
        # prompt's length + c) through the model. A token that starts a page takes one from the pool; a
        # row's first token on a partly filled prompt page takes a copy of that page (copy-on-write).
        seq = prompt_lengths[prompt] + st.t - 1
        copy = live & (st.t == 1) & (tail[prompt] > 0)
        need = live & ((seq % ps == 0) | copy)
        pool, new_page = paged_cache.pop_pages(st.pool, need)
        column = seq // ps
        page_table = st.page_table.at[slots, jnp.where(need, column, max_pages)].set(new_page, mode="drop")
        copy_src, copy_dst = jnp.where(copy, tail_page[prompt], scratch), jnp.where(copy, new_page, scratch)
        pages = jax.lax.cond(
            jnp.any(copy),
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
            seq,
            pages,
            page_table,
            jnp.where(live, seq + 1, 1),  # idle slots: one key (the scratch page's first)
            write_page,
            jnp.where(live, seq % ps, 0),
            num_pages=num_pages,
            impl=attention,
            mesh=kernel_mesh,
        )

        # 2. Draw token t of every live slot from its row's stream at its own index t.
        token, logp, sampling_logp = choose(logits, row_keys[item], st.t)
        token = jnp.where(live, token, pad_id)
        row = jnp.where(live, st.item, n)  # n: dropped
        put = lambda buf, value: buf.at[row, st.t].set(value, mode="drop")
        tokens = put(st.tokens, token)
        logprobs = put(st.logprobs, logp)
        sampling_logprobs = put(st.sampling_logprobs, sampling_logp)
        mask = put(st.mask, jnp.ones_like(token))
        stopped = live & jnp.isin(token, stop_ids_arr)
        t = st.t + live
        done = live & (stopped | (t >= length))

        # 3. Retire: outputs of finished rows, their pages (and their prompt's, once all G are done) freed.
        finished = jnp.where(done, st.item, n)
        lengths = st.lengths.at[finished].set(t, mode="drop")
        truncated = st.truncated.at[finished].set(~stopped, mode="drop")
        refcount = st.refcount.at[jnp.where(done, prompt, batch)].add(-1, mode="drop")
        prompt_freed = (refcount == 0) & (st.refcount > 0)
        own_freed = own_columns(full_pages[prompt], own_pages) & done[:, None]
        in_use = num_pages - pool.free_count  # after this step's pops, before its returns: the peak
        pool = paged_cache.push_pages(
            pool,
            jnp.concatenate([page_table.reshape(-1), prompt_page_ids.reshape(-1)]),
            jnp.concatenate(
                [
                    own_freed.reshape(-1),
                    jnp.broadcast_to(prompt_freed[:, None], prompt_page_ids.shape).reshape(-1),
                ]
            ),
        )
        new = st.replace(
            item=jnp.where(done, n, st.item),
            t=constrain_slots(t),
            token=constrain_slots(token),
            own_pages=jnp.where(done, 0, own_pages),
            page_table=jnp.where(done[:, None], scratch, page_table),
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
            peak_in_use=jnp.maximum(st.peak_in_use, in_use),
            underflows=st.underflows + (in_use > num_pages),
            pages_taken=st.pages_taken + jnp.sum(need, dtype=jnp.int32),
        )
        # 4. Admit: the slots freed in 3 take the next rows now, so they decode in the next step.
        new = admit(new)
        if check_pages:  # every page has exactly one owner: the pool, one live sample, or one live prompt;
            # and a live sample's prompt is live (its pages not returned while a sample reads them)
            counts = paged_cache.page_holders(new.pool, *held_pages(new))
            orphans = (new.item < n) & (new.refcount[jnp.minimum(new.item, n - 1) // g] <= 0)
            errors = jnp.sum(counts != 1, dtype=jnp.int32) + jnp.sum(orphans, dtype=jnp.int32)
            new = new.replace(page_errors=new.page_errors + errors)
        return new

    zeros = jnp.zeros((n, length), jnp.float32)
    zero = jnp.asarray(0, jnp.int32)
    pool = paged_cache.pool_with_free(num_pages, num_prompt_pages)
    pool = paged_cache.push_pages(  # prompts all of whose rows stopped at token 0
        pool,
        prompt_page_ids.reshape(-1),
        jnp.broadcast_to((refcount == 0)[:, None], prompt_page_ids.shape).reshape(-1),
    )
    state = EngineState(
        next_item=zero,
        item=jnp.full((s,), n, jnp.int32),
        t=jnp.zeros((s,), jnp.int32),
        token=jnp.zeros((s,), jnp.int32),
        own_pages=jnp.zeros((s,), jnp.int32),
        page_table=jnp.full((s, max_pages), scratch, jnp.int32),
        refcount=refcount,
        pool=pool,
        pages=pages,
        tokens=constrain_slots(jnp.full((n, length), pad_id, jnp.int32).at[:, 0].set(first_token)),
        logprobs=constrain_slots(zeros.at[:, 0].set(first_logp)),
        sampling_logprobs=constrain_slots(zeros.at[:, 0].set(first_sampling_logp)),
        mask=constrain_slots(jnp.zeros((n, length), jnp.int32).at[:, 0].set(1)),
        lengths=jnp.where(first_done, 1, 0).astype(jnp.int32),
        truncated=first_done & ~first_stopped,
        iterations=zero,
        peak_in_use=jnp.asarray(num_prompt_pages, jnp.int32),
        page_errors=zero,
        underflows=zero,
        pages_taken=zero,
    )
    state = jax.lax.while_loop(lambda st: jnp.any(st.item < n), body, admit(state))
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
        slots=jnp.asarray(s, jnp.int32),
    )
    return outputs, stats


def _engine_body(
    model_config, params, prompt_tokens, prompt_mask, rng, *, mesh, num_slots, decode_layout, **static
):
    """D = `_shards(mesh, B)` sub-engines, one per data shard: shard d takes prompts [d·B/D, (d+1)·B/D)
    (whole groups, so its rows are rows [d·N/D, (d+1)·N/D) of the output), ceil(S/D) slots and a pool of
    its own. With D > 1 they run as one `jax.vmap` over a leading shard axis placed over the batch axes
    (`spmd_axis_name`): each data shard holds its own slots and pages and only its rows' outputs."""
    attention = "pallas" if model_config.attention_impl == "splash" else "xla"
    if attention == "pallas":
        check_platform("splash", interpret=model_config.attention_interpret)
    batch, g = prompt_tokens.shape[0], static["num_samples"]
    n = batch * g
    row_keys = sampling.sample_keys(rng, prompt_tokens, prompt_mask, g)  # [N]
    # Prefill each distinct prompt once: the static sampler's prefill, on the mesh's layout.
    logits, cache = forward_with_cache(
        model_config,
        params,
        prompt_tokens,
        positions_from_mask(prompt_mask),
        init_cache(model_config, batch, prompt_tokens.shape[1]),
        0,
        prompt_mask,
        last_only=True,
    )
    prompt_logits = logits[:, -1]  # [B, V]: token 0 of each sample
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
            outputs, stats = jax.vmap(run, in_axes=(0, 0, 1, 0), spmd_axis_name=BATCH_AXES)(
                split(prompt_mask), split(prompt_logits), cache, split(row_keys)
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
