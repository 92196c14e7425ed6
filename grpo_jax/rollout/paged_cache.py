"""A paged KV cache: a pool of fixed-size pages, a page table per decode slot, and decode attention over it.

PagedAttention (vLLM; Kwon et al., SOSP 2023, arXiv 2309.06180): the keys and values of every layer live
in pages `[layers, num_pages + 1, page_size, kv_heads, head_dim]`; a slot's sequence is the pages its
page table `[S, max_pages]` lists, in order, so a page can be listed by several slots (a prompt's pages by
all G samples of its group) and a finished sample's pages go back to the pool for the next one. The last
page (index `num_pages`) is scratch: unused page-table entries point at it and idle slots write into it;
it is never read unmasked and never in the pool.

The free pool is a stack `free [num_pages]` whose first `free_count` entries are the free pages; popping
and pushing a variable number of pages per step are a cumsum and a scatter (static shapes).

`decode_step` is the reference decode in plain XLA: every layer writes each slot's new key/value into its
page, gathers the slot's pages through its page table into `[S, max_pages * page_size, K, Dh]` and runs
the model's own grouped-query attention (`xla_attention`) masked by which of those positions are real.
It runs on CPU, GPU and TPU; a Pallas paged-attention kernel would replace the gather on TPU.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from grpo_jax.models.attention import xla_attention
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

PagedCache = dict[str, jax.Array]  # {"k", "v"}: [layers, num_pages + 1, page_size, kv_heads, head_dim]


@flax.struct.dataclass
class PagePool:
    """The free pages: `free[:free_count]` (a stack; entries past `free_count` are stale)."""

    free: jax.Array  # [num_pages] int32
    free_count: jax.Array  # [] int32

    @property
    def num_pages(self) -> int:
        return self.free.shape[0]


def init_pages(config: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagedCache:
    """Zeroed pages {"k", "v"}: [layers, num_pages + 1, page_size, kv_heads, head_dim] (+1: the scratch)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (config.num_layers, num_pages + 1, page_size, config.num_kv_heads, config.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


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


def paged_attention_reference(q, k_pages, v_pages, layer, page_table, kv_valid) -> jax.Array:
    """One query per slot over its pages, in plain XLA: q [S, 1, H, Dh]; k_pages/v_pages [layers,
    num_pages + 1, page_size, K, Dh] read at `layer`; page_table [S, max_pages]; kv_valid [S, max_pages *
    page_size] bool -> [S, 1, H, Dh]. One gather per layer reads the slots' pages (no copy of the pool)."""
    s, max_pages = page_table.shape
    gather = lambda pages: pages[layer, page_table].reshape(s, max_pages * pages.shape[2], *pages.shape[3:])
    k, v = gather(k_pages).astype(q.dtype), gather(v_pages).astype(q.dtype)
    return xla_attention(q, k, v, kv_valid[:, None])


def decode_step(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    pages: PagedCache,
    page_table: jax.Array,
    kv_valid: jax.Array,
    write_page: jax.Array,
    write_offset: jax.Array,
) -> tuple[jax.Array, PagedCache]:
    """Feed one token per slot through the model over the paged cache.

    tokens/positions [S] int32; the new key/value of slot s goes to page `write_page[s]` at
    `write_offset[s]` (a page its page table lists, so it attends to itself); kv_valid [S, max_pages *
    page_size] marks the real positions of the gathered sequence, the new one included. Returns
    (float32 logits [S, V], pages). The layer stack is the model's (`_attention_inputs`,
    `_attention_output_and_mlp`: LoRA adapters, biases, RoPE as in training) with the pages in the
    scan carry, written in place.
    """
    x = embed_tokens(config, params, tokens[:, None])  # [S, 1, D]
    positions = positions[:, None]
    inv_freq = rope_inv_frequencies(config)

    def body(carry, layer_and_index):
        x, pages = carry
        layer, index = layer_and_index
        w = _layer_weights(config, layer)
        q, k, v = _attention_inputs(config, w, x, positions, inv_freq)
        pages = {
            "k": pages["k"].at[index, write_page, write_offset].set(k[:, 0].astype(pages["k"].dtype)),
            "v": pages["v"].at[index, write_page, write_offset].set(v[:, 0].astype(pages["v"].dtype)),
        }
        attn = paged_attention_reference(q, pages["k"], pages["v"], index, page_table, kv_valid)
        return (_attention_output_and_mlp(config, w, x, attn), pages), None

    indices = jnp.arange(config.num_layers)
    if config.scan_layers:
        (x, pages), _ = jax.lax.scan(body, (x, pages), (params["layers"], indices))
    else:
        for i in range(config.num_layers):
            layer = jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"])
            (x, pages), _ = body((x, pages), (layer, indices[i]))
    x = rms_norm(x, params["final_norm"].astype(config.compute_dtype), config.rms_norm_eps)
    return logits_from_hidden(config, params, x)[:, 0], pages
