"""The rollout engine's state and geometry (`grpo_jax.rollout.slots` runs the state machine over them):
the page pool's size for a batch (`pool_geometry`), the static shapes of one engine (`Geometry`), the
`EngineState` pytree that a one-shot `generate` keeps inside its loop and partial rollouts carry from one
training step to the next, and an empty one (`init_state`)."""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from grpo_jax.models import ModelConfig
from grpo_jax.rollout import paged_cache


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


@flax.struct.dataclass
class EngineState:
    """The engine between decode iterations, and between calls: partial rollouts carry it from one
    training step to the next. Q group entries (entry q holds one prompt and its G samples, items
    q·G .. q·G + G − 1), NQ = Q·G items, S slots, L = max_new_tokens, MP pages per slot's sequence,
    PP = ceil(P / page_size) pages per prompt. A one-shot `generate` is one entry per prompt (Q = B)."""

    # Group entries.
    pending: jax.Array  # [Q] bool: holds a group not handed out yet (queued, decoding or complete)
    refcount: jax.Array  # [Q] its samples not finished yet (its prompt's pages are held while > 0)
    seq: jax.Array  # [Q] enqueue order: complete groups are handed out oldest first
    next_seq: jax.Array  # []
    prompt_pages: jax.Array  # [Q, PP] the pages its prompt's keys fill (left-justified), its own
    prompt_table: jax.Array  # [Q, MP] its prompt's full pages (shared by the group), then the scratch
    prompt_lengths: jax.Array  # [Q] its prompt's real tokens: the position of token 0
    payload: dict  # [Q, ...] arrays handed out with the group (e.g. its prompt and answer)
    row_keys: jax.Array  # [NQ] each item's random stream
    # The work queue: items in admission order, a ring over [NQ].
    queue: jax.Array  # [NQ]
    queue_head: jax.Array  # []
    queue_len: jax.Array  # []
    # Slots.
    item: jax.Array  # [S] the item a slot decodes (NQ: idle)
    t: jax.Array  # [S] tokens drawn so far for it (the row's own token index of the next draw)
    token: jax.Array  # [S] its last drawn token (index t - 1), fed at its next decode step
    own_pages: jax.Array  # [S] pages of its own it holds (its prompt tail's copy and its tokens')
    page_table: jax.Array  # [S, MP] its prompt's full pages, then its own (scratch where unused)
    paused: jax.Array  # [S] bool: its row drew a pause token and waits for `resume`
    forced: jax.Array  # [S, O] observation tokens to feed instead of drawing (O = max(observation_len, 1))
    forced_len: jax.Array  # [S] how many of them
    forced_at: jax.Array  # [S] how many of them are written so far
    forced_end: jax.Array  # [S] bool: the row ends once they are written (the host ended the trajectory)
    pool: paged_cache.PagePool
    pages: dict  # {"k", "v"} [kv_heads, layers * (num_pages + 1), page_size, head_dim]
    # Outputs, by item.
    tokens: jax.Array  # [NQ, L]
    logprobs: jax.Array  # [NQ, L] behaviour logprobs (full softmax at the temperature)
    sampling_logprobs: jax.Array  # [NQ, L] under the distribution really sampled from
    mask: jax.Array  # [NQ, L] 1 on the row's tokens (drawn and observation)
    generated: jax.Array  # [NQ, L] 1 on drawn tokens only: the loss mask (observation tokens 0)
    turns: jax.Array  # [NQ] pauses so far (tool calls answered or waiting)
    version: jax.Array  # [NQ, L] the policy version whose forward made the logits each token was drawn from
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
    tokens, pages of `page_size` tokens, V logits, the pad token, the decode attention ("xla" or
    "pallas": the kernel's blocks of pages divide the page table). Page sizes: `pool_geometry`."""

    entries: int
    group: int
    slots: int
    prompt_len: int
    length: int
    page_size: int
    vocab: int
    pad_id: int = 0
    attention: str = "xla"
    observation_len: int = 0  # O: the most observation tokens one `resume` feeds a slot (0: no turns)

    @property
    def items(self) -> int:
        return self.entries * self.group

    @functools.cached_property
    def _pool(self) -> dict:
        return pool_geometry(
            self.entries,
            self.prompt_len,
            self.length,
            page_size=self.page_size,
            slots=self.slots,
            attention=self.attention,
        )

    @property
    def prompt_pages(self) -> int:
        return self._pool["prompt_pages"]

    @property
    def own_max(self) -> int:
        return self._pool["own_max"]

    @property
    def max_pages(self) -> int:
        return self._pool["max_pages"]

    @property
    def num_pages(self) -> int:  # every entry's prompt pages plus every slot's worst case: never dry
        return self._pool["num_pages"]


def init_state(
    geom: Geometry, model_config: ModelConfig, payload_shapes: dict | None = None, key_template=None
) -> EngineState:
    """An engine with no groups: every entry free, every slot idle, every page in the pool.
    `payload_shapes`: {name: jax.ShapeDtypeStruct of one group's entry}, carried with each group;
    `key_template`: a typed key of the PRNG implementation the rows' keys will have."""
    q, nq, s, length = geom.entries, geom.items, geom.slots, geom.length
    scratch = geom.num_pages
    zero = jnp.asarray(0, jnp.int32)
    zeros = jnp.zeros((nq, length), jnp.float32)
    template = jax.random.key(0) if key_template is None else key_template
    return EngineState(
        pending=jnp.zeros((q,), bool),
        refcount=jnp.zeros((q,), jnp.int32),
        seq=jnp.zeros((q,), jnp.int32),
        next_seq=zero,
        prompt_pages=jnp.full((q, geom.prompt_pages), scratch, jnp.int32),
        prompt_table=jnp.full((q, geom.max_pages), scratch, jnp.int32),
        prompt_lengths=jnp.zeros((q,), jnp.int32),
        payload={k: jnp.zeros((q, *v.shape), v.dtype) for k, v in (payload_shapes or {}).items()},
        row_keys=jax.random.split(template, nq),
        queue=jnp.zeros((nq,), jnp.int32),
        queue_head=zero,
        queue_len=zero,
        item=jnp.full((s,), nq, jnp.int32),
        t=jnp.zeros((s,), jnp.int32),
        token=jnp.zeros((s,), jnp.int32),
        own_pages=jnp.zeros((s,), jnp.int32),
        page_table=jnp.full((s, geom.max_pages), scratch, jnp.int32),
        paused=jnp.zeros((s,), bool),
        forced=jnp.full((s, max(geom.observation_len, 1)), geom.pad_id, jnp.int32),
        forced_len=jnp.zeros((s,), jnp.int32),
        forced_at=jnp.zeros((s,), jnp.int32),
        forced_end=jnp.zeros((s,), bool),
        pool=paged_cache.pool_with_free(geom.num_pages, 0),
        pages=paged_cache.init_pages(model_config, geom.num_pages, geom.page_size),
        tokens=jnp.full((nq, length), geom.pad_id, jnp.int32),
        logprobs=zeros,
        sampling_logprobs=zeros,
        mask=jnp.zeros((nq, length), jnp.int32),
        generated=jnp.zeros((nq, length), jnp.int32),
        turns=jnp.zeros((nq,), jnp.int32),
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
