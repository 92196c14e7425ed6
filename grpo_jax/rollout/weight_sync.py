"""Weight sync: the trainer's params onto the sampler's own mesh, in the sampler's dtype, once per policy
version (docs/ARCHITECTURE.md, "Asynchronous GRPO"; docs/SCALING.md).

Two moves, neither gathering a whole weight on any chip:
1. the cast to the sampler's dtype (the model's compute dtype, e.g. bfloat16) runs on the TRAINER mesh as
   one jitted elementwise program whose outputs keep the inputs' shardings: each chip casts its own
   shard (a test compiles it and finds no all-gather);
2. `jax.device_put` of the cast tree to the sampler's shardings (`model_param_shardings` on the sampler
   mesh: weights over `tensor` only, whole on every replica). The meshes are disjoint device sets, so
   this is a device-to-device copy in which each sampler chip receives only its own slice.

Several processes (every one holding devices of both meshes, `sharding.split_devices`): JAX's
`device_put` does not copy between the disjoint device sets of a multi-controller run, so step 2 goes
through a *mirror* (`mirror_mesh`, `move_to`): the trainer's devices laid out like the sampler's mesh, each
paired with a sampler device of its own process. A `device_put` on the trainer's device set (a
collective among the trainer's chips) puts on each trainer chip exactly the slice its paired sampler chip
needs, then every process copies its own chips' slices across, device to device, and assembles the global
array. This holds one more slice (the sampler chip's share, in the sampler's dtype) on each trainer chip
while it moves.

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
from jax.sharding import Mesh, NamedSharding

from grpo_jax.models import ModelConfig, model_param_shardings

MIRROR_AXIS = "mirror"


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


def mirror_mesh(source_devices, target_mesh: Mesh) -> tuple[Mesh, dict]:
    """(mirror, pairs): the `source_devices` laid out as a mesh of shape (m, *target_mesh's shape), axes
    (MIRROR_AXIS, *target_mesh's axes), where every process's source devices are m times its target
    devices; pairs maps each target device to the source device at its place in mirror slice 0, on the
    same process. A target spec on the mirror puts on each paired source device the target device's
    slice (replicated over MIRROR_AXIS). Raises one line when a process's counts do not divide."""
    by_process: dict[int, list] = {}
    for d in source_devices:
        by_process.setdefault(d.process_index, []).append(d)
    targets: dict[int, list] = {}
    for d in target_mesh.devices.flat:
        targets.setdefault(d.process_index, []).append(d)
    ratios = {p: divmod(len(by_process.get(p, ())), len(t)) for p, t in targets.items()}
    copies = {q for q, _ in ratios.values()}
    if (
        set(by_process) != set(targets)
        or any(r for _, r in ratios.values())
        or len(copies) != 1
        or 0 in copies
    ):
        raise ValueError(
            "sampler/trainer transfer on several processes: every process's trainer devices must be the "
            "same multiple of its sampler devices "
            f"(per process: { ({p: len(v) for p, v in sorted(by_process.items())}) } and "
            f"{ ({p: len(v) for p, v in sorted(targets.items())}) })"
        )
    (m,) = copies
    layout = np.empty((m, target_mesh.devices.size), dtype=object)
    for flat, device in enumerate(target_mesh.devices.flat):
        i = targets[device.process_index].index(device)
        for j in range(m):
            layout[j, flat] = by_process[device.process_index][j * len(targets[device.process_index]) + i]
    mirror = Mesh(layout.reshape(m, *target_mesh.devices.shape), (MIRROR_AXIS, *target_mesh.axis_names))
    pairs = {device: layout[0, flat] for flat, device in enumerate(target_mesh.devices.flat)}
    return mirror, pairs


def move_to(tree, shardings, *, via_mirror: bool | None = None):
    """`tree` (global arrays on one mesh) in `shardings` (NamedShardings on another mesh, disjoint from
    it). One process: `jax.device_put`. Several (`via_mirror` None: when `jax.process_count() > 1`):
    `device_put` onto the mirror of the target mesh on the source's own devices (`mirror_mesh`), then
    each process copies its paired chips' slices across and assembles the global arrays
    (`jax.make_array_from_single_device_arrays`); a fully replicated array skips the mirror (every
    chip already holds it). The same values either way; `via_mirror=True` forces the mirror in one
    process (tests)."""
    if via_mirror is None:
        via_mirror = jax.process_count() > 1
    if not via_mirror:
        return jax.device_put(tree, shardings)
    mirrors: dict = {}

    def move(x, target: NamedSharding):
        source = x.sharding
        if not source.is_fully_replicated:
            key = (tuple(source.device_set), target.mesh)
            if key not in mirrors:
                devices = sorted(source.device_set, key=lambda d: d.id)
                mirrors[key] = mirror_mesh(devices, target.mesh)
            mirror, pairs = mirrors[key]
            x = jax.device_put(x, NamedSharding(mirror, target.spec))
        shards = {s.device: s.data for s in x.addressable_shards}
        local = target.addressable_devices_indices_map(x.shape)
        arrays = []
        for device, index in local.items():
            if source.is_fully_replicated:
                data = next(iter(shards.values()))[index]
            else:
                data = shards[pairs[device]]
            arrays.append(jax.device_put(data, device))
        return jax.make_array_from_single_device_arrays(x.shape, target, arrays)

    return jax.tree_util.tree_map(move, tree, shardings)


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
            synced = move_to(synced, self.shardings)
        out = SyncedParams(synced, int(version), tree_bytes(synced))
        if wait:
            jax.block_until_ready(synced)
            out.time_s = time.time() - t0
        return out
