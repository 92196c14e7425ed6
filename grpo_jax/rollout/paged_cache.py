"""A paged KV cache: a pool of fixed-size pages, a page table per decode slot, and decode attention over it.

PagedAttention (vLLM; Kwon et al., SOSP 2023, arXiv 2309.06180). Layout, the one the Pallas TPU kernel
(`jax.experimental.pallas.ops.tpu.paged_attention`) reads with no copy: keys and values of every layer
live in `[kv_heads, layers * (num_pages + 1), page_size, head_dim]`, layer l's page p at index
`l * (num_pages + 1) + p` (`page_index`), so one array serves every layer and a layer's page table is
the slot's table plus `l * (num_pages + 1)`. A slot's sequence is the pages its page table `[S,
max_pages]` lists, in order, and its valid keys are exactly the prefix `[0, length)` of that sequence
(no hole: the kernel's contract). A page can be listed by several slots (a prompt's full pages by all G
samples of its group) and a finished sample's pages go back to the pool for the next one. Page index
`num_pages` of each layer is scratch: unused page-table entries point at it and idle slots write into
it; it is never read unmasked and never in the pool.

The free pool is a stack `free [num_pages]` whose first `free_count` entries are the free pages; popping
and pushing a variable number of pages per step are a cumsum and a scatter (static shapes).

`decode_step` feeds one token per slot through the model: every layer writes each slot's new key/value
into its page and attends over the slot's pages with

- `paged_attention_reference` (plain XLA, CPU/GPU/TPU): a gather of the slot's pages into `[kv_heads, S,
  keys, head_dim]`, masked by the length; over a table longer than `REFERENCE_CHUNK_TOKENS` keys, chunk by
  chunk up to the longest slot's length with an online softmax. kv heads lead in the pages and in the
  gathered keys, so the grouped-query einsums need no transpose of them; or
- `paged_attention_kernel` (`ModelConfig.attention_impl == "splash"`: the Pallas kernels on TPU): JAX's
  paged-attention kernel, which DMAs each slot's pages from HBM block by block and stops at its length
  (K/V in bfloat16 inside the kernel); `attention_interpret=True` runs it in Pallas's TPU interpret
  mode on any platform (the tests).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import (
    _attention_inputs,
    _attention_output_and_mlp,
    _layer_weights,
    embed_tokens,
    logits_from_hidden,
    rms_norm,
    rope_inv_frequencies,
)

PagedCache = dict[str, jax.Array]  # {"k", "v"}: [kv_heads, layers * (num_pages + 1), page_size, head_dim]
PAGED_IMPLS = ("xla", "pallas")
KERNEL_BLOCK_TOKENS = 512  # keys per block of the Pallas kernel (its pages_per_compute_block × page_size)
REFERENCE_CHUNK_TOKENS = 128  # keys per chunk of the XLA reference over a long page table


@flax.struct.dataclass
class PagePool:
    """The free pages: `free[:free_count]` (a stack; entries past `free_count` are stale)."""

    free: jax.Array  # [num_pages] int32
    free_count: jax.Array  # [] int32

    @property
    def num_pages(self) -> int:
        return self.free.shape[0]


def init_pages(config: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagedCache:
    """Zeroed pages {"k", "v"}: [kv_heads, layers * (num_pages + 1), page_size, head_dim] (+1: scratch)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (config.num_kv_heads, config.num_layers * (num_pages + 1), page_size, config.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def page_index(layer, page, num_pages: int):
    """Where layer `layer`'s page `page` (num_pages: scratch) sits on the pages' second axis."""
    return layer * (num_pages + 1) + page


def pool_with_free(num_pages: int, first_free: int) -> PagePool:
    """A pool of `num_pages` whose pages [first_free, num_pages) are free (those below are in use)."""
    free = jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32)  # pages popped low-numbered first
    return PagePool(free=free, free_count=jnp.asarray(num_pages - first_free, jnp.int32))


def pop_pages(pool: PagePool, need: jax.Array) -> tuple[PagePool, jax.Array]:
    """One free page for each slot where `need` [S] is True -> (pool, pages [S]; the scratch page where
    not needed, or where the pool ran dry: `free_count` then goes negative, which callers count)."""
    rank = jnp.cumsum(need.astype(jnp.int32)) - 1
    at = pool.free_count - 1 - rank
    ok = need & (at >= 0)
    pages = jnp.where(ok, pool.free[jnp.clip(at, 0, pool.num_pages - 1)], pool.num_pages)
    return pool.replace(free_count=pool.free_count - jnp.sum(need, dtype=jnp.int32)), pages


def push_pages(pool: PagePool, pages: jax.Array, valid: jax.Array) -> PagePool:
    """Return `pages` [M] where `valid` [M] to the pool."""
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    at = jnp.where(valid, pool.free_count + rank, pool.num_pages)  # out of range: dropped
    free = pool.free.at[at].set(pages.astype(jnp.int32), mode="drop")
    return PagePool(free=free, free_count=pool.free_count + jnp.sum(valid, dtype=jnp.int32))


def page_holders(pool: PagePool, held: jax.Array, held_valid: jax.Array) -> jax.Array:
    """How many owners each page [num_pages] has: the pool, plus every valid entry of `held` (pages held
    by live samples and live prompts). Page accounting is exact iff every count is 1."""
    num_pages = pool.num_pages
    in_pool = jnp.arange(num_pages) < pool.free_count
    counts = jnp.zeros((num_pages + 1,), jnp.int32)
    counts = counts.at[jnp.where(in_pool, pool.free, num_pages)].add(1)
    counts = counts.at[jnp.where(held_valid, held, num_pages)].add(1)
    return counts[:num_pages]


def copy_pages(pages: PagedCache, src: jax.Array, dst: jax.Array, num_pages: int, num_layers: int):
    """Copy page src[s] to page dst[s] in every layer (copy-on-write of a shared page; pairs with
    src == dst == scratch copy nothing that matters)."""
    layers = jnp.arange(num_layers)[:, None]
    src_at = page_index(layers, src[None, :], num_pages).reshape(-1)  # [layers * S]
    dst_at = page_index(layers, dst[None, :], num_pages).reshape(-1)
    return {name: p.at[:, dst_at].set(p[:, src_at]) for name, p in pages.items()}


# ------------------------------------------------------------------------------------------------
# Decode attention over the pages: the XLA reference and the Pallas TPU kernel
# ------------------------------------------------------------------------------------------------


def paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, *, chunk_pages=None) -> jax.Array:
    """One query per slot over the prefix [0, length) of its pages, in plain XLA: q [S, H, Dh]; k_pages /
    v_pages [K, total_pages, page_size, Dh]; lengths [S] int32; page_indices [S, max_pages] (into the
    pages' second axis) -> [S, H, Dh]. The kernel's contract.

    Without `chunk_pages` (or when it covers the table): one gather of every slot's whole table and one
    softmax. With it: the table in chunks of `chunk_pages` pages, only as many as the longest slot needs
    (a `while` loop with that trip count), merged by an online softmax (flash-decoding), so a step reads
    the keys in use rather than the table's worst case."""
    s, max_pages = page_indices.shape
    kv_heads, _, page_size, dh = k_pages.shape
    grouped = q.reshape(s, kv_heads, -1, dh).swapaxes(0, 1)  # [K, S, G, Dh]
    if chunk_pages is None or chunk_pages >= max_pages:
        gather = lambda pages: pages[:, page_indices].reshape(kv_heads, s, max_pages * page_size, dh)
        k, v = gather(k_pages).astype(q.dtype), gather(v_pages).astype(q.dtype)  # [K, S, T, Dh]
        scores = jnp.einsum("ksgd,kstd->ksgt", grouped, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
        valid = (jnp.arange(max_pages * page_size)[None, :] < lengths[:, None])[None, :, None, :]
        probs = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1)
        probs = jnp.where(valid, probs, 0.0).astype(v.dtype)
        out = jnp.einsum("ksgt,kstd->ksgd", probs, v)
        return out.swapaxes(0, 1).reshape(q.shape)

    width = chunk_pages * page_size
    chunks = -(-max_pages // chunk_pages)
    table = jnp.pad(page_indices, ((0, 0), (0, chunks * chunk_pages - max_pages)))  # past the end: masked
    trips = (jnp.max(lengths) + width - 1) // width

    def chunk(i, carry):
        m, l, acc = carry  # running max, sum and weighted values of each query: [K, S, G], [K, S, G, Dh]
        columns = jax.lax.dynamic_slice_in_dim(table, i * chunk_pages, chunk_pages, axis=1)
        gather = lambda pages: pages[:, columns].reshape(kv_heads, s, width, dh).astype(q.dtype)
        k, v = gather(k_pages), gather(v_pages)
        scores = jnp.einsum("ksgd,kstd->ksgt", grouped, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
        valid = ((i * width + jnp.arange(width))[None, :] < lengths[:, None])[None, :, None, :]
        scores = jnp.where(valid, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - m_safe[..., None])  # 0 where not valid
        correction = jnp.exp(m - m_safe)
        pv = jnp.einsum("ksgt,kstd->ksgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

    shape = grouped.shape[:3]
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, dh)))
    _, l, acc = jax.lax.fori_loop(0, trips, chunk, init)
    out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)
    return out.swapaxes(0, 1).reshape(q.shape)


def pages_per_compute_block(page_size: int, max_pages: int, block_tokens: int = KERNEL_BLOCK_TOKENS) -> int:
    """The kernel's block of pages: about `block_tokens` keys, dividing `max_pages`."""
    block = max(1, min(max_pages, block_tokens // page_size))
    while max_pages % block:
        block -= 1
    return block


def paged_attention_kernel(
    q,
    k_pages,
    v_pages,
    lengths,
    page_indices,
    *,
    mesh=None,
    interpret=False,
    block_tokens=KERNEL_BLOCK_TOKENS,
) -> jax.Array:
    """`paged_attention_reference` by JAX's Pallas TPU paged-attention kernel (q pre-scaled here: the
    kernel does not scale). With a `mesh`, it runs under `shard_map` with the KV heads (and the query
    heads with them) over `tensor` where they divide; `interpret`: Pallas's TPU interpret mode."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    block = pages_per_compute_block(k_pages.shape[2], page_indices.shape[1], block_tokens)
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)

    def run(q, k_pages, v_pages, lengths, page_indices):
        if interpret:
            with pltpu.force_tpu_interpret_mode():
                return paged_attention(
                    q, k_pages, v_pages, lengths, page_indices, pages_per_compute_block=block
                )
        return paged_attention(q, k_pages, v_pages, lengths, page_indices, pages_per_compute_block=block)

    if mesh is None:
        return run(q, k_pages, v_pages, lengths.astype(jnp.int32), page_indices)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if k_pages.shape[0] % tensor == 0 else None
    P = jax.sharding.PartitionSpec
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(P(None, heads, None), P(heads), P(heads), P(), P()),
        out_specs=P(None, heads, None),
        check_vma=False,
    )(q, k_pages, v_pages, lengths.astype(jnp.int32), page_indices)


def decode_step(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    pages: PagedCache,
    page_table: jax.Array,
    lengths: jax.Array,
    write_page: jax.Array,
    write_offset: jax.Array,
    *,
    num_pages: int,
    impl: str = "xla",
    mesh=None,
) -> tuple[jax.Array, PagedCache]:
    """Feed one token per slot through the model over the paged cache.

    tokens/positions [S] int32; the new key/value of slot s goes to page `write_page[s]` at
    `write_offset[s]` (a page its page table lists, at sequence index length - 1, so it attends to itself);
    lengths [S]: the keys the slot sees, the prefix [0, length) of its page table [S, max_pages]
    (page ids in [0, num_pages]). `impl`: "xla" (`paged_attention_reference`) or "pallas"
    (`paged_attention_kernel`, under `shard_map` on `mesh`). Returns (float32 logits [S, V], pages).

    params: the model's, with `params["layers"]` either stacked (run under `lax.scan`, each layer's
    weights cast to the compute dtype at every step) or a tuple of per-layer weights already cast and
    placed (`rollout.engine.decode_params`: the decode layout, an unrolled layer loop that reads each
    layer's weights where they lie). The layer code is the model's (`_attention_inputs`,
    `_attention_output_and_mlp`: LoRA adapters, biases, RoPE as in training); the pages ride in the carry
    and are written in place.
    """
    if impl not in PAGED_IMPLS:
        raise ValueError(f"decode_step: impl must be one of {PAGED_IMPLS}, got {impl!r}")
    x = embed_tokens(config, params, tokens[:, None])  # [S, 1, D]
    positions = positions[:, None]
    page_size = pages["k"].shape[2]
    inv_freq = rope_inv_frequencies(config)

    def attention(q, pages, index):
        table = page_index(index, page_table, num_pages)
        if impl == "pallas":
            return paged_attention_kernel(
                q, pages["k"], pages["v"], lengths, table, mesh=mesh, interpret=config.attention_interpret
            )
        return paged_attention_reference(
            q, pages["k"], pages["v"], lengths, table, chunk_pages=max(1, REFERENCE_CHUNK_TOKENS // page_size)
        )

    def layer_step(x, pages, w, index):
        q, k, v = _attention_inputs(config, w, x, positions, inv_freq)
        at = page_index(index, write_page, num_pages)
        pages = {
            name: pages[name].at[:, at, write_offset].set(new[:, 0].swapaxes(0, 1).astype(pages[name].dtype))
            for name, new in (("k", k), ("v", v))
        }
        attn = attention(q[:, 0], pages, index)[:, None]
        return _attention_output_and_mlp(config, w, x, attn), pages

    layers = params["layers"]
    if isinstance(layers, list | tuple):  # the decode layout: per-layer weights, cast and placed once
        for i, w in enumerate(layers):
            x, pages = layer_step(x, pages, w, i)
    else:

        def body(carry, layer_and_index):
            layer, index = layer_and_index
            return layer_step(*carry, _layer_weights(config, layer), index), None

        indices = jnp.arange(config.num_layers)
        if config.scan_layers:
            (x, pages), _ = jax.lax.scan(body, (x, pages), (layers, indices))
        else:
            for i in range(config.num_layers):
                layer = jax.tree_util.tree_map(lambda a, i=i: a[i], layers)
                (x, pages), _ = body((x, pages), (layer, indices[i]))
    x = rms_norm(x, params["final_norm"].astype(config.compute_dtype), config.rms_norm_eps)
    return logits_from_hidden(config, params, x)[:, 0], pages
