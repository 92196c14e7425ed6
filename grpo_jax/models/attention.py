"""Attention backends behind one call, and masks that never build the T × S matrix.

A query sees a key when the key is real and, for causal attention, not after the query: `AttentionMask`
holds exactly that, `kv_valid` [B, S] and the causal offset (query t sits at key index `q_offset + t`),
so a backend that works in blocks derives each block's mask on the fly. Backends
(`ModelConfig.attention_impl`, docs/ARCHITECTURE.md "Attention backends"):

- "xla": scores [B, H, T, S] and a softmax; the reference every other backend is tested against.
- "chunked": blockwise attention with the online softmax of flash attention (Dao et al., arXiv
  2205.14135; the backward of FlashAttention-2, arXiv 2307.08691 §3.1) in pure JAX: the forward maps over
  query blocks and scans over key blocks; a custom VJP recomputes each block's probabilities from the
  saved log-sum-exp, so forward and backward hold O(block × block) scores per step and O(T) state.
  Runs on CPU, GPU and TPU.
- "splash": the Pallas TPU splash attention kernel, the left padding as segment ids, sharded over the
  batch and head axes of the mesh with `shard_map`.
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` on NVIDIA GPUs.

`attend_with_lse` also returns the log-sum-exp of each query's scores, so two partial attentions over
disjoint key sets (shared-prefix training: a group's prompt and each sample's own tokens) merge exactly
(`merge_partials`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax.models.config import ATTENTION_IMPLS

_NEG_INF = -1e30


class AttentionMask(NamedTuple):
    """Which keys each query sees. kv_valid [B, S] bool: the key is a real token. q_offset: None (every
    real key is visible) or the causal offset, an int or a scalar array: query t sees keys s <= q_offset
    + t (0 for a sequence attending to itself; the cache slot of the first query when decoding)."""

    kv_valid: jax.Array
    q_offset: Any = None

    def dense(self, num_queries: int) -> jax.Array:
        """The [B, T, S] bool matrix the "xla" backend uses."""
        allowed = self.kv_valid[:, None, :]
        if self.q_offset is None:
            return jnp.broadcast_to(allowed, (allowed.shape[0], num_queries, allowed.shape[2]))
        return self.causal(0, num_queries, 0, self.kv_valid.shape[1])[None] & allowed

    def causal(self, q_start, num_queries: int, k_start, num_keys: int) -> jax.Array:
        """[T, S] bool: key s (from k_start) not after query t (from q_start); all True if not causal."""
        if self.q_offset is None:
            return jnp.ones((num_queries, num_keys), bool)
        queries = self.q_offset + q_start + jnp.arange(num_queries)
        return (k_start + jnp.arange(num_keys))[None, :] <= queries[:, None]


def causal_mask(kv_valid: jax.Array, q_offset=0) -> AttentionMask:
    return AttentionMask(kv_valid > 0, q_offset)


def full_mask(kv_valid: jax.Array) -> AttentionMask:
    return AttentionMask(kv_valid > 0, None)


# ------------------------------------------------------------------------------------------------
# xla: the reference
# ------------------------------------------------------------------------------------------------


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    b, t, h, dh = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, dh)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention over a dense mask.

    q [B, T, H, Dh], k/v [B, S, K, Dh], allowed [B, T, S] bool -> [B, T, H, Dh]. Fully masked query rows
    (padding) produce zeros, never NaN.
    """
    b, t, h, dh = q.shape
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32
    ) / math.sqrt(dh)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(allowed[:, None, None, :, :], probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def _xla_with_lse(q, k, v, mask: AttentionMask):
    b, t, h, dh = q.shape
    allowed = mask.dense(t)[:, None, None]
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32
    ) / math.sqrt(dh)
    scores = jnp.where(allowed, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, T], -inf where nothing is visible
    probs = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v).reshape(b, t, h, dh)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, t, h)


# ------------------------------------------------------------------------------------------------
# chunked: flash attention's recurrence in pure JAX, with a recomputing backward
# ------------------------------------------------------------------------------------------------


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Split `axis` (already a multiple of `size`) into blocks, block index first."""
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(x.shape[0] // size, size, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_blocks`: [nb, ..., size (at axis + 1), ...] -> [..., nb * size (at axis), ...]."""
    x = jnp.moveaxis(x, axis + 1, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jnp.moveaxis(x, 0, axis)


def _block_scores(qb, kb, kv_valid_b, mask, q_start, k_start, scale):
    """Scores [B, K, G, bq, bk] (float32) of a query block against a key block, and which are allowed."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    allowed = mask.causal(q_start, qb.shape[1], k_start, kb.shape[1])[None] & kv_valid_b[:, None, :]
    return scores, allowed[:, None, None]


def _chunked_forward(q, k, v, kv_valid, q_offset, causal, block_q, block_k):
    """(out [B, T, K, G, Dh], lse [B, K, G, T]) with q already grouped [B, T, K, G, Dh]."""
    b, t, kv_heads, g, dh = q.shape
    mask = AttentionMask(kv_valid, q_offset if causal else None)
    scale = 1.0 / math.sqrt(dh)
    qs = _blocks(_pad_to(q, 1, block_q), 1, block_q)  # [nq, B, bq, K, G, Dh]
    ks = _blocks(_pad_to(k, 1, block_k), 1, block_k)  # [nk, B, bk, K, Dh]
    vs = _blocks(_pad_to(v, 1, block_k), 1, block_k)
    valid = _blocks(_pad_to(kv_valid, 1, block_k, False), 1, block_k)  # [nk, B, bk]

    def one_query_block(args):
        qb, i = args

        def over_keys(carry, xs):
            m, l, acc = carry
            kb, vb, vb_valid, j = xs
            scores, allowed = _block_scores(qb, kb, vb_valid, mask, i * block_q, j * block_k, scale)
            scores = jnp.where(allowed, scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(scores - m_safe[..., None])  # 0 where not allowed
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            acc = acc * correction.transpose(0, 3, 1, 2)[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((b, kv_heads, g, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, kv_heads, g, block_q), jnp.float32),
            jnp.zeros((b, block_q, kv_heads, g, dh), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(over_keys, init, (ks, vs, valid, jnp.arange(ks.shape[0])))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0).transpose(0, 3, 1, 2)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    outs, lses = jax.lax.map(one_query_block, (qs, jnp.arange(qs.shape[0])))
    out = _unblocks(outs, 1)[:, :t]  # [B, T, K, G, Dh]
    lse = _unblocks(lses, 3)[..., :t]  # [B, K, G, T]
    return out, lse


def _chunked_fwd(q, k, v, kv_valid, q_offset, causal, block_q, block_k):
    out, lse = _chunked_forward(q, k, v, kv_valid, q_offset, causal, block_q, block_k)
    return (out, lse), (q, k, v, kv_valid, q_offset, out, lse)


def _chunked_bwd(causal, block_q, block_k, residuals, cotangents):
    """FlashAttention-2's backward (arXiv 2307.08691 §3.1), the lse cotangent included: each key block's
    probabilities are recomputed from the saved lse, dS = P ∘ (dP − D + dlse) with D = rowsum(dO ∘ O)."""
    q, k, v, kv_valid, q_offset, out, lse = residuals
    d_out, d_lse = cotangents
    b, t, kv_heads, g, dh = q.shape
    mask = AttentionMask(kv_valid, q_offset if causal else None)
    scale = 1.0 / math.sqrt(dh)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    qs = _blocks(_pad_to(q, 1, block_q), 1, block_q)
    dos = _blocks(_pad_to(d_out, 1, block_q), 1, block_q)
    lses = _blocks(_pad_to(lse_safe, 3, block_q), 3, block_q)  # [nq, B, K, G, bq]
    deltas = _blocks(_pad_to(delta - d_lse.astype(jnp.float32), 3, block_q), 3, block_q)
    ks = _blocks(_pad_to(k, 1, block_k), 1, block_k)
    vs = _blocks(_pad_to(v, 1, block_k), 1, block_k)
    valid = _blocks(_pad_to(kv_valid, 1, block_k, False), 1, block_k)

    def over_keys(dq, xs):
        kb, vb, vb_valid, j = xs

        def over_queries(carry, ys):
            dk, dv = carry
            qb, dob, lseb, deltab, i = ys
            scores, allowed = _block_scores(qb, kb, vb_valid, mask, i * block_q, j * block_k, scale)
            p = jnp.where(allowed, jnp.exp(scores - lseb[..., None]), 0.0)  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, dob.astype(jnp.float32))
            dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[..., None]) * scale
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(jnp.float32))
            dq_block = jnp.einsum("bkgqs,bskd->bqkgd", ds, kb.astype(jnp.float32))
            return (dk, dv), dq_block

        zeros = jnp.zeros((b, block_k, kv_heads, dh), jnp.float32)
        (dk, dv), dq_blocks = jax.lax.scan(
            over_queries, (zeros, zeros), (qs, dos, lses, deltas, jnp.arange(qs.shape[0]))
        )
        return dq + dq_blocks, (dk, dv)

    dq0 = jnp.zeros(qs.shape, jnp.float32)
    dq, (dks, dvs) = jax.lax.scan(over_keys, dq0, (ks, vs, valid, jnp.arange(ks.shape[0])))
    dq = _unblocks(dq, 1)[:, :t].astype(q.dtype)
    dk = _unblocks(dks, 1)[:, : k.shape[1]].astype(k.dtype)
    dv = _unblocks(dvs, 1)[:, : v.shape[1]].astype(v.dtype)
    return dq, dk, dv, None, None


_chunked_with_lse = jax.custom_vjp(
    lambda q, k, v, kv_valid, q_offset, causal, block_q, block_k: _chunked_forward(
        q, k, v, kv_valid, q_offset, causal, block_q, block_k
    ),
    nondiff_argnums=(5, 6, 7),
)
_chunked_with_lse.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention_with_lse(q, k, v, mask: AttentionMask, *, block_size: int = 512):
    """Blockwise attention: (out [B, T, H, Dh], lse [B, T, H] float32) in O(block²) memory per step.

    Blocks of `block_size` queries and keys (the last ones padded, padded keys masked); a query that sees
    no key gives 0 and lse −inf. Differentiable (in q, k, v) through a recomputing custom VJP.
    """
    b, t, h, dh = q.shape
    causal = mask.q_offset is not None
    offset = jnp.asarray(0 if mask.q_offset is None else mask.q_offset, jnp.int32)
    block_q, block_k = max(1, min(block_size, t)), max(1, min(block_size, k.shape[1]))
    out, lse = _chunked_with_lse(
        _grouped(q, k.shape[2]), k, v, mask.kv_valid, offset, causal, block_q, block_k
    )
    return out.reshape(b, t, h, dh), lse.transpose(0, 3, 1, 2).reshape(b, t, h)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


def merge_partials(first: tuple[jax.Array, jax.Array], second: tuple[jax.Array, jax.Array]) -> jax.Array:
    """One attention from two over disjoint key sets: (out [B, T, H, Dh], lse [B, T, H]) each, weighted
    by exp(lse) — exactly the softmax over the union. A query that sees no key in either gives 0."""
    (o1, l1), (o2, l2) = first, second
    top = jax.lax.stop_gradient(jnp.maximum(l1, l2))  # any shift gives the same value and gradient
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w1, w2 = jnp.exp(l1 - top), jnp.exp(l2 - top)
    total = w1 + w2
    out = (o1.astype(jnp.float32) * w1[..., None] + o2.astype(jnp.float32) * w2[..., None]) / jnp.where(
        total > 0, total, 1.0
    )[..., None]
    return out.astype(o1.dtype)


def attend_with_lse(q, k, v, mask: AttentionMask, *, impl: str = "xla", block_size: int = 512):
    """(out [B, T, H, Dh], lse [B, T, H]) of `impl` ("xla" or "chunked": the backends that return their
    log-sum-exp differentiably)."""
    if impl == "chunked":
        return chunked_attention_with_lse(q, k, v, mask, block_size=block_size)
    if impl == "xla":
        return _xla_with_lse(q, k, v, mask)
    raise ValueError(f"attend_with_lse: attention_impl={impl!r} gives no log-sum-exp; use 'xla' or 'chunked'")


def attend(
    q, k, v, mask: AttentionMask, *, impl: str = "xla", block_size: int = 512, interpret: bool = False
) -> jax.Array:
    """Grouped-query attention q [B, T, H, Dh] over k/v [B, S, K, Dh] under `mask` -> [B, T, H, Dh].
    `interpret`: run a Pallas kernel ("splash") in interpret mode, on any platform."""
    if impl == "xla":
        return xla_attention(q, k, v, mask.dense(q.shape[1]))
    if impl == "chunked":
        return chunked_attention_with_lse(q, k, v, mask, block_size=block_size)[0]
    if impl == "splash":
        from grpo_jax.models.splash import splash_attention

        return splash_attention(q, k, v, mask, block_size=block_size, interpret=interpret)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def cudnn_attention(q, k, v, mask: AttentionMask) -> jax.Array:
    """cuDNN's fused attention (`jax.nn.dot_product_attention`, implementation="cudnn"). The left padding
    reaches it as a dense boolean mask: the kernel never stores the scores, the mask is [B, 1, T, S]."""
    check_platform("cudnn")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(q.shape[1])[:, None], implementation="cudnn")
    return out.astype(q.dtype)


_PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
_NEEDS = {"splash": "a TPU", "cudnn": "an NVIDIA GPU"}
_INSTEAD = {"splash": "'chunked' (any platform)", "cudnn": "'chunked' (any platform) or 'splash' on TPU"}


def target_platform() -> str:
    """The platform the program being traced compiles for: the activation mesh's devices (an AOT compile
    for a TPU topology on a CPU host targets "tpu"), else JAX's default backend."""
    from grpo_jax.models.transformer import current_activation_mesh

    mesh = current_activation_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def check_platform(impl: str, *, interpret: bool = False) -> None:
    """One line naming the backend, the platform and what to use instead, where `impl` cannot run."""
    platform = target_platform()
    if impl in _PLATFORMS and platform not in _PLATFORMS[impl] and not interpret:
        where = "interpret mode (ModelConfig.attention_interpret=True, slow) or " if impl == "splash" else ""
        raise ValueError(
            f"attention_impl={impl!r} needs {_NEEDS[impl]}, but the program runs on {platform}: use "
            f"{where}{_INSTEAD[impl]}"
        )
