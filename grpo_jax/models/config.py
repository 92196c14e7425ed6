"""Model configuration for the Llama / Qwen2 decoder family.

`ModelConfig` is frozen and hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from grpo_jax.inputs import DTYPES, canonical_dtype

# Activation rematerialisation of the layer stack, by name (maxtext's manner): what the backward keeps
# from the forward; the rest is recomputed. The named activations are tagged in models.transformer.
REMAT_POLICIES = (
    "none",  # keep everything
    "full",  # keep nothing but the layer's input
    "dots",  # keep every matmul output
    "dots_with_no_batch_dims",  # keep the matmuls without a batch dimension (the projections)
    "save_qkv_proj",  # keep the q, k, v projections
    "save_attention",  # keep q, k, v and the attention output (recompute the MLP)
    "offload_qkv_proj",  # move q, k, v to pinned host memory, fetch them back for the backward
    "offload_attention",  # move q, k, v and the attention output to host memory
)
STRICT_SHARDING = ("auto", "on", "off")
ATTENTION_IMPLS = ("xla", "chunked", "splash", "cudnn")
# How a model runs, as opposed to its shapes: what a config's `model` section sets for a pretrained
# checkpoint or a preset as well (their shapes come from config.json or the preset table).
RUNTIME_FIELDS = (
    "param_dtype",
    "dtype",
    "remat",
    "scan_layers",
    "attention_impl",
    "attention_block_size",
    "attention_interpret",
    "strict_sharding",
)
__all__ = ["ATTENTION_IMPLS", "DTYPES", "REMAT_POLICIES", "RUNTIME_FIELDS", "ModelConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Llama 2/3, Qwen2/2.5 families).

    Attributes mirror Hugging Face `config.json` names where one exists.
    `rope_scaling` is stored as a sorted tuple of (key, value) pairs so the config stays hashable;
    `rope_scaling_dict` gives it back as a dict (Llama-3 style: rope_type="llama3", factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings; or rope_type="linear", factor).
    `param_dtype` (weights) and `dtype` (activations) take a name ("bfloat16", "bf16") or a dtype
    (`jnp.bfloat16`) and are stored as the canonical name, so equal configs hash equal and serialise.
    `attention_impl` picks the attention backend (`grpo_jax.models.attention`: "xla", the reference;
    "chunked", blockwise with an online softmax; "splash", the Pallas TPU kernel; "cudnn"), with
    `attention_block_size` the chunked backend's block of queries and keys, and `attention_interpret`
    running the Pallas kernel in interpret mode (any platform, slow: for tests). `remat` names what the
    backward keeps (`REMAT_POLICIES`); `strict_sharding` ("auto": on except on CPU meshes) makes a
    parameter whose dimension a sharding rule's mesh axis does not divide an error instead of a silently
    replicated weight.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "xla"
    attention_block_size: int = 512
    attention_interpret: bool = False
    strict_sharding: str = "auto"
    architecture: str = "llama"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if not isinstance(self.attention_block_size, int) or self.attention_block_size < 1:
            raise ValueError(
                f"ModelConfig.attention_block_size must be a positive int, got {self.attention_block_size!r}"
            )
        if self.strict_sharding not in STRICT_SHARDING:
            raise ValueError(
                f"ModelConfig.strict_sharding must be one of {STRICT_SHARDING}, got {self.strict_sharding!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, canonical_dtype(getattr(self, name), f"ModelConfig.{name}"))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        scaling = self.rope_scaling_dict
        if scaling is not None and scaling.get("rope_type") not in ("llama3", "linear", "default"):
            raise ValueError(
                f"ModelConfig.rope_scaling: unsupported rope_type {scaling.get('rope_type')!r} "
                "(supported: 'llama3', 'linear', 'default')"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.resolved_head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head
