"""Llama / Qwen2 family decoder: config, pure forward, KV-cache decode, HF import/export."""

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.hf import load_pretrained, save_pretrained
from grpo_jax.models.kv_cache import forward_with_cache, init_cache
from grpo_jax.models.placement import init_sharded_params, model_param_shardings
from grpo_jax.models.shared_prefix import completion_logprobs_shared_prefix
from grpo_jax.models.transformer import (
    KVCache,
    Params,
    activation_sharding,
    completion_logprobs,
    forward,
    forward_hidden,
    init_params,
    logical_axes,
    logits_from_hidden,
    logprobs_from_hidden,
    param_shapes,
    positions_from_mask,
    token_logprobs,
    with_activation_sharding,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "Params",
    "activation_sharding",
    "completion_logprobs",
    "completion_logprobs_shared_prefix",
    "forward",
    "forward_hidden",
    "forward_with_cache",
    "init_cache",
    "init_params",
    "init_sharded_params",
    "load_pretrained",
    "logical_axes",
    "logits_from_hidden",
    "logprobs_from_hidden",
    "model_param_shardings",
    "param_shapes",
    "positions_from_mask",
    "save_pretrained",
    "token_logprobs",
    "with_activation_sharding",
]
