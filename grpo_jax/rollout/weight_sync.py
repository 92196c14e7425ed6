"""Weight sync: the trainer's params onto the sampler's own mesh, in the sampler's dtype, once per policy
version (docs/ARCHITECTURE.md, "Asynchronous GRPO"; docs/SCALING.md).

Two moves, neither gathering a whole weight on any chip:
1. the cast to the sampler's dtype (the model's compute dtype, e.g. bfloat16) runs on the TRAINER mesh as
   one jitted elementwise program whose outputs keep the inputs' shardings: each chip casts its own
   shard (a test compiles it and finds no all-gather);
2. `jax.device_put` of the cast tree to the sampler's shardings (`model_param_shardings` on the sampler
   mesh: weights over `tensor` only, whole on every replica). The meshes are disjoint device sets, so
   this is a device-to-device copy in which each sampler chip receives only its own slice.

Double-buffered: the sampler keeps the version its in-flight rollouts decode with while the next one
lands (`WeightSync.push` returns a new tree; the previous one stays alive as long as a dispatched rollout
reads it), which costs one extra copy of the weights in the sampler's dtype on the sampler chips.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models import ModelConfig, model_param_shardings


@dataclasses.dataclass
class SyncedParams:
    """One policy version on the sampler mesh: `params` (the model's param tree in the sampler's dtype,
    in the sampler's shardings), `version` (the trainer's `state.step` it was taken at), `bytes` (what
    moved: the sum of the leaves' sizes in the sampler's dtype) and `time_s` (wall time until it had
    landed, 0.0 while not waited for)."""

    params: dict
    version: int
    bytes: int
    time_s: float = 0.0


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays (global sizes, not per chip)."""
    return int(
        sum(np.prod(x.shape, dtype=np.int64) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    )


class WeightSync:
    """Trainer params -> the sampler mesh (see the module docstring).

    `model_config`: the policy's shapes (the tree pushed must be the model's plain param tree: with LoRA
    the merged weights, `config.lora.sampler_weights="merged"`); `sampler_mesh`: the sampler's mesh
    (`grpo_jax.sharding.make_sampler_mesh`); `dtype`: the sampler's dtype, default the model's compute
    dtype (what the decode casts to anyway, `rollout.decode_layout`).
    """

    def __init__(self, model_config: ModelConfig, sampler_mesh=None, dtype=None):
        self.dtype = jnp.dtype(dtype or model_config.compute_dtype)
        self.sampler_mesh = sampler_mesh
        # Without a sampler mesh (a co-located pipeline) the cast alone: a fresh copy on the trainer's
        # mesh that the in-flight rollout reads while the update donates the state's own buffers.
        self.shardings = None if sampler_mesh is None else model_param_shardings(sampler_mesh, model_config)
        self._casts: dict = {}

    def cast_fn(self, params):
        """The jitted cast for `params`' shardings (built once per layout): float leaves to the sampler's
        dtype, every output in its input's sharding, so no chip holds more than its own shard."""
        in_shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
        key = jax.tree_util.tree_structure(params), tuple(jax.tree_util.tree_leaves(in_shardings))
        if key not in self._casts:
            dtype = self.dtype

            def cast(tree):
                return jax.tree_util.tree_map(
                    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
                )

            self._casts[key] = jax.jit(cast, in_shardings=(in_shardings,), out_shardings=in_shardings)
        return self._casts[key]

    def push(self, params, version: int, *, wait: bool = False) -> SyncedParams:
        """Dispatch the cast on the trainer mesh and the copy onto the sampler mesh (asynchronous: the
        returned tree is usable at once, JAX orders the rollout after its arrival). `wait`: block until
        it has landed and record the seconds in `time_s`."""
        if self.shardings is not None and jax.tree_util.tree_structure(
            params
        ) != jax.tree_util.tree_structure(self.shardings):
            raise ValueError(
                "weight sync: the sampler takes the model's plain param tree (with LoRA set "
                "config.lora.sampler_weights='merged')"
            )
        t0 = time.time()
        synced = self.cast_fn(params)(params)
        if self.shardings is not None:
            synced = jax.device_put(synced, self.shardings)
        out = SyncedParams(synced, int(version), tree_bytes(synced))
        if wait:
            jax.block_until_ready(synced)
            out.time_s = time.time() - t0
        return out
