"""Analytic costs of the programs: matmul and attention FLOPs of a GRPO update and of the sampler, FLOPs
and bytes of one decode step, and the TPU chips' HBM and peak rate.

XLA's `cost_analysis()` counts a loop body once (the scanned layer stack, the decode loop), so the
ahead-of-time report (scripts/aot_compile.py) and the benchmarks (benchmarks/) print these counts beside it.
"""

from __future__ import annotations

import jax.numpy as jnp

from grpo_jax.models import ModelConfig

# HBM per device (a v4 / v5p megacore chip is one device) and peak dense bf16 FLOP/s per chip, from the
# Cloud TPU system architecture pages; keyed by `device_kind`.
TPU_CHIPS = {
    "TPU v4": dict(hbm_gib=32, peak_bf16_tflops=275),
    "TPU v5 lite": dict(hbm_gib=16, peak_bf16_tflops=197),
    "TPU v5": dict(hbm_gib=95, peak_bf16_tflops=459),
    "TPU v6 lite": dict(hbm_gib=32, peak_bf16_tflops=918),
}


def layer_matmul_params(model: ModelConfig) -> int:
    """Weights of one decoder layer multiplied by every token: q, k, v, o and the three MLP projections."""
    d, f, hd = model.hidden_size, model.intermediate_size, model.resolved_head_dim
    return d * hd * (2 * model.num_heads + 2 * model.num_kv_heads) + 3 * d * f


def matmul_param_count(model: ModelConfig) -> int:
    """Weights multiplied by every token: attention and MLP projections plus the output head (the
    embedding is a gather, not a matmul, unless it is tied and doubles as the head)."""
    return model.num_layers * layer_matmul_params(model) + model.hidden_size * model.vocab_size


def grpo_step_flops(model: ModelConfig, grpo, prompts: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul + attention FLOPs of one GRPO step (XLA's cost analysis counts each loop body once): the
    reference forward (β > 0), then μ passes of forward + backward (2× forward) + the remat recompute of
    the layer forward, over all prompts × G rows of prompt_len + new_tokens tokens (the model attends over
    the whole padded sequence; the chunked vocabulary projection covers the whole sequence too)."""
    n, t = prompts * grpo.num_generations, prompt_len + new_tokens
    attention = 4 * model.num_heads * model.resolved_head_dim * t
    layers = n * t * model.num_layers * (2 * layer_matmul_params(model) + attention)
    forward = layers + n * t * 2 * model.hidden_size * model.vocab_size
    recompute = layers if model.remat != "none" else 0.0
    reference = forward if grpo.kl_coef > 0 else 0.0
    return float(reference + grpo.num_iterations * (3 * forward + recompute))


def grpo_update_flops_done(
    model: ModelConfig, grpo, prompts: int, prompt_len: int, new_tokens: int, *, shared_prefix: bool
) -> float:
    """The useful FLOPs one GRPO update computes (no remat recompute): the reference forward (β > 0) and
    μ policy forwards + backwards (2× forward). With `shared_prefix` each prompt goes through the layers
    once per group (prompts × P + rows × L positions instead of rows × (P + L)) and attends to itself
    only; the vocabulary projection covers the rows × L completion positions either way."""
    rows = prompts * grpo.num_generations
    p, length = prompt_len, new_tokens
    if shared_prefix:
        positions, query_keys = prompts * p + rows * length, prompts * p * p + rows * length * (p + length)
    else:
        positions, query_keys = rows * (p + length), rows * (p + length) ** 2
    attention = model.num_layers * 4 * model.num_heads * model.resolved_head_dim * query_keys
    forward = 2 * layer_matmul_params(model) * model.num_layers * positions + attention
    forward += 2 * model.hidden_size * model.vocab_size * rows * length
    reference = forward if grpo.kl_coef > 0 else 0.0
    return float(reference + grpo.num_iterations * 3 * forward)


def grpo_sampler_flops(model: ModelConfig, grpo, prompts: int, prompt_len: int, new_tokens: int) -> float:
    """Upper bound (no early stop): prefill of the prompts (logits at every prompt position), then
    prompts × G × new_tokens single-token decode steps that attend over all cache slots."""
    n, s = prompts * grpo.num_generations, prompt_len + new_tokens
    per_token = 2 * layer_matmul_params(model) * model.num_layers + 2 * model.hidden_size * model.vocab_size
    attention = 4 * model.num_heads * model.resolved_head_dim * s * model.num_layers
    return float((prompts * prompt_len + n * new_tokens) * (per_token + attention))


def decode_step_costs(model: ModelConfig, rows: int, cache_len: int, filled_len: float) -> dict[str, float]:
    """FLOPs and bytes of one decode step over `rows` sequences.

    Attention FLOPs (QK^T and PV, 4·H·Dh per key) are given over the `cache_len` keys the sampler reads
    each step (it attends to the whole cache, masked) and over the `filled_len` keys that are real.
    Bytes are the least any implementation must read: every matmul weight once, and the K and V of the
    real keys (`kv_bytes_full_cache`: of the whole cache, as the sampler reads it).
    """
    layers, heads, kv_heads, hd = (
        model.num_layers,
        model.num_heads,
        model.num_kv_heads,
        model.resolved_head_dim,
    )
    weight_flops = 2.0 * matmul_param_count(model) * rows
    attn_per_key = 4.0 * heads * hd * layers * rows
    weight_bytes = matmul_param_count(model) * jnp.dtype(model.param_dtype).itemsize
    kv_per_key = 2.0 * layers * rows * kv_heads * hd * jnp.dtype(model.dtype).itemsize
    return {
        "weight_flops": weight_flops,
        "attention_flops_full_cache": attn_per_key * cache_len,
        "attention_flops_filled": attn_per_key * filled_len,
        "flops_full_cache": weight_flops + attn_per_key * cache_len,
        "weight_bytes": float(weight_bytes),
        "kv_bytes_full_cache": kv_per_key * cache_len,
        "kv_bytes_filled": kv_per_key * filled_len,
        "min_bytes": weight_bytes + kv_per_key * filled_len,
    }
