"""Completion logprobs of G rows that share a prompt, with the prompt's forward computed once per group
(`ModelConfig`-driven, the GRPO step's `shared_prefix_group`): each layer runs the prompt's B rows and
the completions' B·G rows, and each completion attends to its group's prompt keys where they lie."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grpo_jax.models.attention import (
    attend_with_lse,
    causal_mask,
    full_mask,
    merge_partials,
    xla_attention,
)
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import (
    _NEG_INF,
    Params,
    _attention_inputs,
    _attention_output_and_mlp,
    _layer_weights,
    _remat_policy,
    embed_tokens,
    logprobs_from_hidden,
    positions_from_mask,
    rms_norm,
    rope_inv_frequencies,
    self_attention,
)


def _prefix_attention(q, k_prefix, v_prefix, prefix_allowed, k, v, allowed):
    """Attention of a group's rows over its shared prefix and their own tokens, with no copy of the prefix.

    q [B, G, T, H, Dh]; k_prefix/v_prefix [B, P, K, Dh] (one per group), prefix_allowed [B, P] bool;
    k/v [B, G, T, K, Dh], allowed [B, G, T, T] bool -> [B, G, T, H, Dh]. The softmax runs over the
    concatenated P + T keys, as `attention` over the full sequence would.
    """
    b, g, t, h, dh = q.shape
    kv_heads = k.shape[3]
    q = q.reshape(b, g, t, kv_heads, h // kv_heads, dh)
    scale = 1.0 / math.sqrt(dh)
    prefix_scores = jnp.einsum("bntkqd,bpkd->bnkqtp", q, k_prefix, preferred_element_type=jnp.float32)
    own_scores = jnp.einsum("bntkqd,bnskd->bnkqts", q, k, preferred_element_type=jnp.float32)
    allowed_all = jnp.concatenate(
        [jnp.broadcast_to(prefix_allowed[:, None, None, :], (b, g, t, k_prefix.shape[1])), allowed], axis=-1
    )[:, :, None, None]  # [B, G, 1, 1, T, P + T]
    scores = jnp.concatenate([prefix_scores, own_scores], axis=-1) * scale
    scores = jnp.where(allowed_all, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(allowed_all, probs, 0.0).astype(v.dtype)
    p = k_prefix.shape[1]
    out = jnp.einsum("bnkqtp,bpkd->bntkqd", probs[..., :p], v_prefix)
    out = out + jnp.einsum("bnkqts,bnskd->bntkqd", probs[..., p:], v)
    return out.reshape(b, g, t, h, dh)


def _shared_prefix_attention(config, q, k_prefix, v_prefix, prefix_mask, k, v, own_mask, own_allowed):
    """Each row's completion queries q [N, T, H, Dh] over its group's prompt keys k/v_prefix [N/G, P, K, Dh]
    (prefix_mask [N/G, P]) and its own keys k/v [N, T, K, Dh] (causal, own_mask [N, T]), without copying
    the prompt's keys per row where the backend allows it:

    - "xla": one softmax over the concatenated scores (`_prefix_attention`, own_allowed [N/G, G, T, T]);
    - "chunked": two partial attentions (the prompt part is not causal: it all precedes the completion)
      merged exactly by their log-sum-exp (`attention.merge_partials`);
    - "splash", "cudnn": their kernels return no differentiable log-sum-exp, so the prompt's keys are
      broadcast to the group's rows and put before the row's own: one causal attention at offset P.
    """
    n, t, h, dh = q.shape
    b = k_prefix.shape[0]
    g = n // b
    impl = config.attention_impl
    if impl == "xla":
        grouped = lambda x: x.reshape(b, g, *x.shape[1:])
        out = _prefix_attention(
            grouped(q), k_prefix, v_prefix, prefix_mask > 0, grouped(k), grouped(v), own_allowed
        )
        return out.reshape(n, t, h, dh)
    if impl == "chunked":
        block = config.attention_block_size
        prefix_out, prefix_lse = attend_with_lse(
            q.reshape(b, g * t, h, dh),
            k_prefix,
            v_prefix,
            full_mask(prefix_mask),
            impl=impl,
            block_size=block,
        )
        own = attend_with_lse(q, k, v, causal_mask(own_mask), impl=impl, block_size=block)
        return merge_partials((prefix_out.reshape(n, t, h, dh), prefix_lse.reshape(n, t, h)), own)
    keys = jnp.concatenate([jnp.repeat(k_prefix, g, axis=0), k], axis=1)
    values = jnp.concatenate([jnp.repeat(v_prefix, g, axis=0), v], axis=1)
    valid = jnp.concatenate([jnp.repeat(prefix_mask, g, axis=0), own_mask], axis=1)
    return self_attention(config, q, keys, values, causal_mask(valid, k_prefix.shape[1]))


def completion_logprobs_shared_prefix(
    config: ModelConfig,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    group_size: int,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
):
    """`completion_logprobs` with each prompt's forward computed once per group instead of once per row.

    Rows come in groups of `group_size` consecutive rows that continue the same prompt (prompt_tokens
    [N, P] holds it once per row, as the GRPO batch does; the group's first row is read). The prompt's
    hidden states and keys/values are computed for N / group_size rows and every row's completion
    attends to its group's copy; autodiff sums the rows' contributions through the shared prefix, so
    values and gradients equal the per-row forward's up to float reassociation. With P prompt and L
    completion tokens it saves (G - 1) / G of the prompt's share P / (P + L) of the forward's FLOPs.
    """
    n, length = completion_tokens.shape
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the {n} completion rows")
    b, g = n // group_size, group_size
    prompt_tokens, prompt_mask = prompt_tokens[::g], prompt_mask[::g]
    full_mask = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), completion_mask], axis=1)
    positions = positions_from_mask(full_mask)[:, prompt_tokens.shape[1] :]
    prompt_positions = positions_from_mask(prompt_mask)
    p = prompt_tokens.shape[1]
    prompt_allowed = own_allowed = None  # the dense [P, P] and [L, L] masks: only "xla" reads them
    if config.attention_impl == "xla":
        prompt_allowed = jnp.tril(jnp.ones((p, p), bool))[None] & (prompt_mask[:, None, :] > 0)
        own_allowed = jnp.tril(jnp.ones((length, length), bool))[None] & (completion_mask[:, None, :] > 0)
        own_allowed = own_allowed.reshape(b, g, length, length)
    inv_freq = rope_inv_frequencies(config)

    def body(carry, layer):
        x_prompt, x = carry
        w = _layer_weights(config, layer)
        q_p, k_p, v_p = _attention_inputs(config, w, x_prompt, prompt_positions, inv_freq)
        if config.attention_impl == "xla":
            prompt_attn = xla_attention(q_p, k_p, v_p, prompt_allowed)
        else:
            prompt_attn = self_attention(config, q_p, k_p, v_p, causal_mask(prompt_mask))
        x_prompt = _attention_output_and_mlp(config, w, x_prompt, prompt_attn)
        q, k, v = _attention_inputs(config, w, x, positions, inv_freq)
        attn = _shared_prefix_attention(config, q, k_p, v_p, prompt_mask, k, v, completion_mask, own_allowed)
        x = _attention_output_and_mlp(config, w, x, attn)
        return (x_prompt, x), None

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(config.remat))
    carry = (embed_tokens(config, params, prompt_tokens), embed_tokens(config, params, completion_tokens))
    if config.scan_layers:
        carry, _ = jax.lax.scan(body, carry, params["layers"])
    else:
        for i in range(config.num_layers):
            carry, _ = body(carry, jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"]))
    x_prompt, x = carry
    final_norm = params["final_norm"].astype(config.compute_dtype)
    last_prompt = jnp.repeat(rms_norm(x_prompt[:, -1:], final_norm, config.rms_norm_eps), g, axis=0)
    hidden = jnp.concatenate([last_prompt, rms_norm(x[:, :-1], final_norm, config.rms_norm_eps)], axis=1)
    return logprobs_from_hidden(
        config,
        params,
        hidden,
        completion_tokens,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
