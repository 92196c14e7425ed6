"""The "splash" attention backend: Pallas's TPU splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`) behind `grpo_jax.models.attention.attend`.

The kernel computes one example's attention for a group of query heads sharing one key/value head
(`make_splash_mqa_single_device`), so grouped-query attention maps over the batch and the kv heads. Its
mask is static: causal with the (static) offset, or full; the left padding of a row enters as segment
ids (real keys segment 1, padding 0; every query 1), which the kernel compares per block. Sequences are
padded to the kernel's block size and queries pre-scaled by 1/sqrt(Dh) (the kernel does not scale).
Inside an `activation_sharding` mesh the call runs under `shard_map`: rows over ("data", "fsdp") and heads
over "tensor" where they divide, so every chip runs the kernel on its own rows and heads.
`attention_interpret=True` runs the kernel in Pallas interpret mode: any platform, slow (the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from grpo_jax.models.attention import AttentionMask, check_platform

_BATCH_AXES = ("data", "fsdp")


def _block(length: int, preferred: int) -> int:
    """The largest of preferred, preferred/2, ... (at least 128) that divides `length`."""
    block = max(preferred, 128)
    while block > 128 and length % block:
        block //= 2
    return block


def _kernel(t: int, s: int, group: int, offset: int | None, block: int, interpret: bool):
    if offset is None:
        head_mask = mask_lib.FullMask((t, s))
    else:
        head_mask = mask_lib.CausalMask((t, s), offset=offset)
    block_q, block_kv = _block(t, block), _block(s, block)
    sizes = kernel_lib.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return kernel_lib.make_splash_mqa_single_device(
        mask=mask_lib.MultiHeadMask([head_mask] * group), block_sizes=sizes, interpret=interpret
    )


def _unsharded(q, k, v, kv_valid, *, offset, block, interpret):
    """q [B, T, H, Dh] (pre-scaled), k/v [B, S, K, Dh], kv_valid [B, S] -> [B, T, H, Dh]."""
    b, t, h, dh = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = h // kv_heads
    unit = 128  # the kernel's lane width: its blocks are multiples of it, interpreted or not
    tp, sp = -(-t // unit) * unit, -(-s // unit) * unit
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    kv_segments = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, sp - s)))
    q_segments = jnp.ones((b, tp), jnp.int32)
    splash = _kernel(tp, sp, group, offset, block, interpret)

    def one(q_heads, k_head, v_head, q_seg, kv_seg):  # [G, Tp, Dh], [Sp, Dh], [Sp, Dh]
        return splash(q_heads, k_head, v_head, segment_ids=kernel_lib.SegmentIds(q=q_seg, kv=kv_seg))

    grouped = q.reshape(b, tp, kv_heads, group, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, Dh]
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over kv heads
    out = jax.vmap(per_head)(
        grouped, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_segments, kv_segments
    )
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, dh)[:, :t].astype(q.dtype)


def splash_attention(q, k, v, mask: AttentionMask, *, block_size: int = 512, interpret: bool = False):
    """`attend(..., impl="splash")`: q [B, T, H, Dh] over k/v [B, S, K, Dh] -> [B, T, H, Dh]. The mask's
    causal offset must be a Python int (static) or None. Rows and heads are split over the activation
    mesh with `shard_map` where they divide it."""
    check_platform("splash", interpret=interpret)
    if not isinstance(mask.q_offset, int | None):
        raise ValueError("splash attention needs a static causal offset (an int), not a traced one")
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    run = functools.partial(_unsharded, offset=mask.q_offset, block=block_size, interpret=interpret)
    from grpo_jax.models.transformer import current_activation_mesh

    mesh = current_activation_mesh()
    if mesh is None:
        return run(q, k, v, mask.kv_valid)
    rows = tuple(a for a in _BATCH_AXES if a in mesh.shape)
    rows = rows if q.shape[0] % math.prod(mesh.shape[a] for a in rows) == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    spec = P(rows, None, heads, None)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, P(rows, None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, mask.kv_valid)
