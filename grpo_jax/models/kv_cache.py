"""KV-cache decoding: `init_cache` and `forward_with_cache`, the two pieces `grpo_jax.sampling` builds its
prefill and decode loop from. The layer stack is the training forward's (`transformer._run_layers`), with
the cache carried through it and written in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.inputs import canonical_dtype
from grpo_jax.models.attention import causal_mask
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import (
    KVCache,
    Params,
    _run_layers,
    embed_tokens,
    logits_from_hidden,
    rms_norm,
)


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """Zeroed KV cache {"k", "v"}: [L, B, S, K, Dh] each, in `dtype` (a name or a dtype; default: the
    compute dtype)."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(canonical_dtype(dtype, "init_cache(dtype)"))
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_with_cache(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    cache_index: jax.Array,
    key_mask: jax.Array,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Prefill a block or extend by one token, reading and writing the KV cache.

    tokens/positions [B, T] are written at cache slots [cache_index, cache_index + T); key_mask [B, S]
    marks which cache slots hold real tokens (including the new ones). A query at slot s attends to
    slots <= s that are real. Returns (float32 logits [B, T, V], updated cache); with `last_only`, the
    logits of the last position only ([B, 1, V]: a prefill needs no more, and a [B, P, V] float32 block
    would be the prefill's largest tensor).
    """
    x = embed_tokens(config, params, tokens)
    mask = causal_mask(key_mask, cache_index)  # a query at slot s sees the real slots <= s
    x, cache = _run_layers(config, params["layers"], x, positions, mask, cache, cache_index)
    if last_only:
        x = x[:, -1:]
    x = rms_norm(x, params["final_norm"].astype(config.compute_dtype), config.rms_norm_eps)
    return logits_from_hidden(config, params, x), cache
