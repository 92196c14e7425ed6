"""A pure-functional decoder-only transformer (Llama / Qwen2 family).

Params are a plain dict pytree; layer weights are stacked on a leading `layers` axis so the layer
stack runs under `lax.scan` (compile time independent of depth). Every parameter has logical axis
names (`logical_axes`), which `grpo_jax.sharding` maps to mesh axes.

Layout (D hidden, H heads, K kv heads, Dh head dim, F mlp, V vocab, L layers):
    embed        [V, D]                       ("vocab", "embed")
    layers/attn_norm, mlp_norm [L, D]         ("layers", "norm")
    layers/q     [L, D, H, Dh]   k, v [L, D, K, Dh]   o [L, H, Dh, D]
    layers/q_bias [L, H, Dh]  k_bias, v_bias [L, K, Dh]  o_bias [L, D]   (optional)
    layers/gate, up [L, D, F]   down [L, F, D]
    layers/lora/<target>/a, b                 (optional) LoRA adapters, see `grpo_jax.models.lora`
    final_norm   [D]
    lm_head      [D, V]   (absent when embeddings are tied)

RoPE follows the Hugging Face "rotate half" convention so imported checkpoints need no permutation.
The KV-cache entry points (`init_cache`, `forward_with_cache`) are in `grpo_jax.models.kv_cache`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from grpo_jax.inputs import as_key
from grpo_jax.models.attention import (
    AttentionMask,
    attend,
    causal_mask,
)
from grpo_jax.models.config import ModelConfig
from grpo_jax.sharding import BATCH_AXES, logical_to_spec

Params = dict[str, Any]
KVCache = dict[str, jax.Array]  # {"k": [L, B, S, K, Dh], "v": [L, B, S, K, Dh]}

_NEG_INF = -1e30


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Shape of every parameter, as a pytree of tuples mirroring the params dict."""
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, Dh = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    layers = {
        "attn_norm": (L, D),
        "q": (L, D, H, Dh),
        "k": (L, D, K, Dh),
        "v": (L, D, K, Dh),
        "o": (L, H, Dh, D),
        "mlp_norm": (L, D),
        "gate": (L, D, F),
        "up": (L, D, F),
        "down": (L, F, D),
    }
    if config.qkv_bias:
        layers.update(q_bias=(L, H, Dh), k_bias=(L, K, Dh), v_bias=(L, K, Dh))
    if config.o_bias:
        layers["o_bias"] = (L, D)
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def logical_axes(config: ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter (same structure as the params)."""
    layers = {
        "attn_norm": ("layers", "norm"),
        "q": ("layers", "embed", "heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers.update(
            q_bias=("layers", "heads", "head_dim"),
            k_bias=("layers", "kv_heads", "head_dim"),
            v_bias=("layers", "kv_heads", "head_dim"),
        )
    if config.o_bias:
        layers["o_bias"] = ("layers", "norm")
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random init: normal(0, 0.02) matrices (scaled-down output projections), unit norms, zero biases.

    `rng` is a typed key (`jax.random.key`) or a raw one (`jax.random.PRNGKey`); both give the same params.
    Wrap in `jax.jit(..., out_shardings=...)` (see `grpo_jax.models.init_sharded_params`) to create the
    params directly sharded without ever materialising them on one device.
    """
    shapes = param_shapes(config)
    dtype = config.weight_dtype
    std = 0.02
    out_std = std / math.sqrt(2 * config.num_layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(as_key(rng, "init_params(rng)"), len(flat))
    leaves = []
    for key, (path, shape) in zip(keys, flat):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            scale = out_std if name in ("o", "down") else std
            leaves.append((scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019), computed in float32 like HF, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inv_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse RoPE frequencies [Dh/2], with Llama-3 or linear scaling applied (RoFormer arXiv 2104.09864)."""
    dh = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = config.rope_scaling_dict
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1 frequency-dependent scaling (transformers `_compute_llama3_parameters`).
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, Dh] by positions [B, T] (rotate-half convention)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions [B, T] counting only real tokens, so left padding does not shift RoPE."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def dense(x: jax.Array, w: jax.Array, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., *in] · w [*in, *out] -> [..., *out], `in` being x's last `contract` dims, as ONE 2-D matmul
    over the flattened leading dims. Written as a 3-D einsum ("btd,df->btf"), the weight gradient on
    XLA:CPU contracts over two dims and gets a transposed copy of the incoming gradient, fused into its
    producer as a strided write (the profile in benchmarks/README.md shows its share of the step). The
    flattened dims keep their sharding (rows and heads stay major)."""
    lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    if w.shape[:contract] != inner:
        raise ValueError(f"dense: x {x.shape} does not contract with w {w.shape} over {contract} dims")
    k = math.prod(inner)
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *w.shape[contract:])


# The activations a remat policy can name (tagged with `checkpoint_name` in the layer).
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
ATTENTION_NAMES = (*QKV_NAMES, "attention_out")


def _remat_policy(name: str):
    """`ModelConfig.remat` -> a `jax.checkpoint` policy (see `config.REMAT_POLICIES`)."""
    policies = jax.checkpoint_policies
    offload = lambda names: policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(names),
        offload_src="device",
        offload_dst="pinned_host",
    )
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_saveable,
        "dots_with_no_batch_dims": policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": policies.save_only_these_names(*QKV_NAMES),
        "save_attention": policies.save_only_these_names(*ATTENTION_NAMES),
        "offload_qkv_proj": offload(QKV_NAMES),
        "offload_attention": offload(ATTENTION_NAMES),
    }[name]


def _constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation to the layout its logical axes name (`sharding.DEFAULT_RULES`: heads and the MLP
    hidden over "tensor", rows over the batch axes) inside an `activation_sharding` block; a rule whose
    axis does not divide is dropped. Outside one: x unchanged."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    spec = logical_to_spec(logical, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _layer_weights(config, layer):
    return jax.tree_util.tree_map(lambda p: p.astype(config.compute_dtype), layer)


def _project(x: jax.Array, w, name: str, contract: int = 1) -> jax.Array:
    """x · W_name, plus x · A · B when the layer carries a LoRA adapter for it (`w["lora"][name]`, B
    already scaled by α/r: `grpo_jax.models.lora.attach`): W + (α/r)·B·A applied without merging it
    (Hu et al., arXiv 2106.09685). Without an adapter, exactly `dense(x, W)`."""
    y = dense(x, w[name], contract)
    adapter = w.get("lora", {}).get(name)
    if adapter is not None:
        y = y + dense(dense(x, adapter["a"], contract), adapter["b"])
    return y


def _attention_inputs(config, w, x, positions, inv_freq):
    """Pre-norm projections of x [B, T, D]: q [B, T, H, Dh], k and v [B, T, K, Dh], RoPE applied, heads
    over "tensor", named for the remat policies."""
    h = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
    q = _project(h, w, "q")
    k = _project(h, w, "k")
    v = _project(h, w, "v")
    if config.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = checkpoint_name(_constrain(q, ("batch", "length", "heads", "head_dim")), "query_proj")
    k = checkpoint_name(_constrain(k, ("batch", "length", "kv_heads", "head_dim")), "key_proj")
    v = checkpoint_name(_constrain(v, ("batch", "length", "kv_heads", "head_dim")), "value_proj")
    return q, k, v


def _attention_output_and_mlp(config, w, x, attn):
    """The block's rest: x + o(attn), then x + mlp(norm(x)). attn [B, T, H, Dh] -> x [B, T, D]."""
    attn = checkpoint_name(_constrain(attn, ("batch", "length", "heads", "head_dim")), "attention_out")
    out = _project(attn, w, "o", contract=2)
    if config.o_bias:
        out = out + w["o_bias"]
    x = x + out
    h = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
    gated = _constrain(jax.nn.silu(_project(h, w, "gate")) * _project(h, w, "up"), ("batch", "length", "mlp"))
    return x + _project(gated, w, "down")


def self_attention(config, q, k, v, mask: AttentionMask) -> jax.Array:
    """q [B, T, H, Dh] over k/v [B, S, K, Dh] with the config's backend (`config.attention_impl`). A single
    query (a decode step: [B, H, 1, S] scores, linear in S) and a causal offset only known at run time
    (a prefill into the KV cache) are not splash's case and go through "xla" and "chunked"."""
    impl = config.attention_impl
    if q.shape[1] == 1:
        impl = "xla"
    elif impl == "splash" and not isinstance(mask.q_offset, int | None):
        impl = "chunked"
    return attend(
        q, k, v, mask, impl=impl, block_size=config.attention_block_size, interpret=config.attention_interpret
    )


def _decoder_layer(
    config, layer, x, positions, inv_freq, mask, cache=None, layer_index=None, cache_index=None
):
    """One pre-norm decoder block. x [B, T, D], mask an `AttentionMask` over the keys -> (x, cache).

    With `cache` (the whole stack, {"k", "v"}: [L, B, S, K, Dh]) this block's new keys/values are written
    in place at (layer_index, :, cache_index) and attention reads that layer's slots; without it,
    attention reads the block's own keys/values.
    """
    w = _layer_weights(config, layer)
    q, k, v = _attention_inputs(config, w, x, positions, inv_freq)
    if cache is not None:
        at = (layer_index, 0, cache_index, 0, 0)
        cache = {
            "k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
            "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at),
        }
        k, v = (
            cache["k"][layer_index].astype(config.compute_dtype),
            cache["v"][layer_index].astype(config.compute_dtype),
        )
    return _attention_output_and_mlp(config, w, x, self_attention(config, q, k, v, mask)), cache


def _run_layers(config, layers, x, positions, mask, cache=None, cache_index=None):
    """Apply the layer stack (scanned or unrolled); returns (x, updated cache or None).

    The KV cache rides in the scan carry and each layer updates its slice in place, so a decode step
    touches the cache only to write one token and read it for attention (scanning the cache as xs/ys
    would copy every layer's cache every step; benchmarks/README.md measures the difference).
    """
    inv_freq = rope_inv_frequencies(config)

    def body(carry, layer_and_index):
        x, cache = carry
        layer, index = layer_and_index
        return _decoder_layer(config, layer, x, positions, inv_freq, mask, cache, index, cache_index), None

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(config.remat))
    indices = jnp.arange(config.num_layers)
    if config.scan_layers:
        (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, indices))
    else:
        for i in range(config.num_layers):
            (x, cache), _ = body((x, cache), jax.tree_util.tree_map(lambda a, i=i: a[i], (layers, indices)))
    return x, cache


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("activation_mesh", default=None)


def current_activation_mesh():
    """The mesh of the enclosing `activation_sharding` block (None outside one)."""
    return _ACTIVATION_MESH.get()


@contextlib.contextmanager
def activation_sharding(mesh):
    """While tracing inside this block, the token embeddings [B, T, D] (the residual stream's start) are
    constrained to rows over the mesh's ("data", "fsdp") axes when B divides. Without it XLA propagates
    the embedding table's layout (hidden dimension over fsdp) into the residual stream and keeps every
    row on every fsdp device, multiplying the step's activation memory by the fsdp size (compiled for a
    TPU slice in benchmarks/tpu_aot.md). The step builders and the sampler trace under it; None: no-op."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def with_activation_sharding(fn, mesh):
    """`fn` traced under `activation_sharding(mesh)` (wrap a step before `jax.jit`)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return wrapped


def embed_tokens(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    x = jnp.take(params["embed"], tokens, axis=0).astype(config.compute_dtype)
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def logits_from_hidden(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] (final-normed) -> float32 logits [..., V]."""
    dtype = config.compute_dtype
    head = params["embed"].astype(dtype).T if config.tie_embeddings else params["lm_head"].astype(dtype)
    return dense(hidden, head, preferred_element_type=jnp.float32)


def forward_hidden(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] (compute dtype) for a full sequence.

    attention_mask [B, T] (1 real, 0 padding) masks padded keys; positions default to the count of
    real tokens so left-padded and unpadded sequences give the same values on real tokens.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    x = embed_tokens(config, params, tokens)
    x, _ = _run_layers(config, params["layers"], x, positions, causal_mask(attention_mask))
    return rms_norm(x, params["final_norm"].astype(config.compute_dtype), config.rms_norm_eps)


def forward(
    config: ModelConfig, params: Params, tokens: jax.Array, *, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Training forward: tokens [B, T] int32 -> logits float32 [B, T, V] (docs/CONTRACTS.md)."""
    hidden = forward_hidden(config, params, tokens, attention_mask=attention_mask)
    return logits_from_hidden(config, params, hidden)


def token_logprobs(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
):
    """Log-probability of each next token, without materialising [B, T, V] logits at once.

    tokens [B, T]; returns logprobs [B, T-1] where entry t is log p(tokens[t+1] | tokens[:t+1]) under
    softmax(logits / temperature), and, if `with_entropy`, the entropy [B, T-1] of that distribution.
    The vocabulary projection runs over sequence chunks of `chunk_size` under `jax.checkpoint`, so
    the backward pass also keeps only one chunk of logits alive.
    """
    hidden = forward_hidden(config, params, tokens, attention_mask=attention_mask)[:, :-1]
    targets = tokens[:, 1:]
    return logprobs_from_hidden(
        config,
        params,
        hidden,
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


def completion_logprobs(
    config: ModelConfig,
    params: Params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
):
    """Logprobs (and entropies) [N, L] of completion tokens [N, L] continuing left-padded prompts [N, P],
    from one full-sequence forward at `temperature` (the π_θ(o_t | q, o_<t) of the GRPO loss). Only the
    completion positions go through the vocabulary projection."""
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    hidden = forward_hidden(config, params, tokens, attention_mask=mask)
    hidden = hidden[:, prompt_tokens.shape[1] - 1 : -1]  # the state before each completion token
    return logprobs_from_hidden(
        config,
        params,
        hidden,
        completion_tokens,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


def logprobs_from_hidden(
    config, params, hidden, targets, *, temperature=1.0, chunk_size=128, with_entropy=False
):
    """Chunked vocabulary projection: hidden [B, T, D], targets [B, T] -> logprobs [B, T] (+ entropy)."""
    b, t, d = hidden.shape
    chunk = max(1, min(chunk_size, t))
    num_chunks = -(-t // chunk)
    pad = num_chunks * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h, y):
        logits = logits_from_hidden(config, params, h) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp, ent

    def body(carry, xs):
        return carry, one_chunk(*xs)

    _, (logp, ent) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(b, -1)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :t]
    return (logp, ent) if with_entropy else logp
