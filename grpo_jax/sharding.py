"""Device mesh, logical-axis sharding rules, sharded init and batch placement.

One `Mesh` with axes ("data", "fsdp", "tensor"). Parameters carry logical axis names
(`grpo_jax.models.logical_axes`); `DEFAULT_RULES` maps each logical name to mesh axes, so changing
the table changes the parallelism, not the model code. Batches are sharded over ("data", "fsdp").
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Chips whose physical axes jax.make_mesh lets a logical axis split (it does the same for one slice).
_SPLITTABLE_KINDS = ("TPU v5 lite", "TPU v5e")

# logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("lora_rank", None),  # a LoRA adapter's rank: small, replicated
)


def _axis_sizes(shape: Sequence[int] | Mapping[str, int], what: str) -> list[int]:
    """A ("data", "fsdp", "tensor") shape as a list of ints: a sequence of 3, or a mapping by axis name."""
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"{what}: unknown axis name(s) {unknown}; axes are {MESH_AXES}")
        shape = [shape.get(axis, 1) for axis in MESH_AXES]
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{what} {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    return shape


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
    devices=None,
    dcn_shape: Sequence[int] | Mapping[str, int] | None = None,
) -> Mesh:
    """Build a ("data", "fsdp", "tensor") mesh; one entry of `shape` may be -1 and is filled from the
    device count.

    `shape` is the WHOLE mesh. One slice (`dcn_shape` None or all ones): `jax.make_mesh` lays the axes
    onto the physical topology (on TPU the later, busier axes get the torus rings; on CPU the devices
    keep their order, so tests can pass a permuted `devices`). Several slices: `dcn_shape` says how many
    slices each axis spans (e.g. (2, 1, 1): data parallel over 2 slices, each slice holding a
    (data/2, fsdp, tensor) block laid out by its own topology, `mesh_utils.create_hybrid_device_mesh`),
    so only that axis's collectives cross the data-centre network. A slice is the devices sharing a
    `slice_index` (multislice TPU); devices all in one slice or without one (GPU, CPU) are grouped by
    host (`process_index`).
    `devices` defaults to `jax.devices()` (AOT compiles pass a topology's devices).

    Raises ValueError naming the shape and the device or slice count when they do not fit.
    """
    shape = _axis_sizes(shape, "mesh shape")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(f"mesh shape {shape} does not divide the {n} available devices")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {n} are available"
        )
    dcn = [1] * len(MESH_AXES) if dcn_shape is None else _axis_sizes(dcn_shape, "dcn mesh shape")
    if math.prod(dcn) == 1:
        slices = {getattr(d, "slice_index", 0) for d in devices}
        if len(slices) > 1:
            raise ValueError(
                f"the {n} devices span {len(slices)} slices: give a dcn mesh shape (config.dcn_mesh) whose "
                f"product is {len(slices)}, e.g. {(len(slices), 1, 1)} for data parallelism over slices"
            )
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    return Mesh(hybrid_device_array(shape, dcn, devices), MESH_AXES)


SAMPLER_AXES = ("replica", "tensor")


def sampler_mesh_shape(shape, what: str = "config.sampler_mesh") -> tuple[int, int]:
    """`config.sampler_mesh` as (replica, tensor): two positive ints (docs/CONTRACTS.md)."""
    try:
        sizes = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != len(SAMPLER_AXES) or any(s < 1 for s in sizes):
        raise ValueError(f"{what}={shape!r} must be two positive ints for the axes {SAMPLER_AXES}")
    return sizes


def split_devices(devices, sampler_shape, what: str = "config.sampler_mesh") -> tuple[list, list]:
    """(trainer devices, sampler devices), each in `devices`' order. One host (every device's
    `process_index` the same): the sampler takes the LAST replica × tensor devices, the trainer the rest.
    Several hosts: every host gives the sampler the last replica × tensor / hosts of ITS devices and keeps
    the rest for the trainer, so each process holds devices of both meshes and takes part in every
    transfer between them (multi-controller JAX: every process issues the same programs and copies;
    docs/ARCHITECTURE.md, "Asynchronous GRPO"). Raises one line when none would be left for the trainer
    or the sampler's devices do not divide over the hosts."""
    devices = list(devices)
    replica, tensor = sampler_mesh_shape(sampler_shape, what)
    wanted = replica * tensor
    if wanted >= len(devices):
        raise ValueError(
            f"{what}={(replica, tensor)} takes {wanted} devices and leaves none of the {len(devices)} "
            "for the trainer's config.mesh"
        )
    hosts: dict[int, list] = {}
    for d in devices:
        hosts.setdefault(getattr(d, "process_index", 0), []).append(d)
    if len(hosts) == 1:
        return devices[:-wanted], devices[-wanted:]
    per_host = wanted // len(hosts)
    sizes = {len(h) for h in hosts.values()}
    if wanted % len(hosts) or len(sizes) != 1 or per_host >= min(sizes):
        raise ValueError(
            f"{what}={(replica, tensor)}: its {wanted} devices must split evenly over the {len(hosts)} "
            f"processes, leaving each some of its {sorted(sizes)} devices for the trainer"
        )
    taken = {d for key in sorted(hosts) for d in hosts[key][-per_host:]}
    return [d for d in devices if d not in taken], [d for d in devices if d in taken]


def make_sampler_mesh(sampler_shape, devices) -> Mesh:
    """The sampler's mesh over `devices` (exactly replica × tensor of them, in order): ("replica",
    "tensor") laid out as a ("data", "fsdp", "tensor") mesh of shape (replica, 1, tensor), so every
    sampling path (the rollout engine, `sampling.generate`, the batch helpers here) runs on it unchanged:
    rows split over the replicas (`BATCH_AXES`), weights split over `tensor` only and whole on every
    replica (`DEFAULT_RULES`' fsdp split is a no-op at fsdp = 1)."""
    replica, tensor = sampler_mesh_shape(sampler_shape)
    devices = list(devices)
    if len(devices) != replica * tensor:
        raise ValueError(
            f"config.sampler_mesh={(replica, tensor)} needs {replica * tensor} devices, got {len(devices)}"
        )
    return Mesh(np.array(devices, dtype=object).reshape(replica, 1, tensor), MESH_AXES)


def device_granules(devices) -> tuple[str, list[list]]:
    """(attribute, groups): the devices grouped into slices by `slice_index` when they span several
    (multislice TPU), else by host (`process_index`: GPU and CPU devices carry no slice index or all
    the same); groups in key order, devices in their order."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    attribute = "slice_index" if len(slices) > 1 and None not in slices else "process_index"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, attribute), []).append(d)
    return attribute, [groups[key] for key in sorted(groups)]


def hybrid_device_array(shape: Sequence[int], dcn_shape: Sequence[int], devices) -> np.ndarray:
    """The devices of a multi-slice mesh as an array of `shape`: axis i is `dcn_shape[i]` slices of
    `shape[i] / dcn_shape[i]` devices (see `make_mesh`). Any objects with `id`, `platform`,
    `device_kind` and `slice_index` or `process_index` will do (tests fake the slices)."""
    shape, dcn_shape = [int(s) for s in shape], [int(s) for s in dcn_shape]
    if any(d < 1 or s % d for s, d in zip(shape, dcn_shape)):
        raise ValueError(
            f"dcn mesh shape {dict(zip(MESH_AXES, dcn_shape))} must divide the mesh shape "
            f"{dict(zip(MESH_AXES, shape))} axis by axis"
        )
    attribute, granules = device_granules(devices)
    if len(granules) != math.prod(dcn_shape):
        raise ValueError(
            f"dcn mesh shape {dict(zip(MESH_AXES, dcn_shape))} needs {math.prod(dcn_shape)} slices but the "
            f"{len(devices)} devices form {len(granules)} (grouped by {attribute})"
        )
    if len({len(g) for g in granules}) != 1:
        raise ValueError(f"the slices (grouped by {attribute}) hold different numbers of devices")
    per_slice = [s // d for s, d in zip(shape, dcn_shape)]
    return mesh_utils.create_hybrid_device_mesh(
        per_slice,
        dcn_shape,
        [d for g in granules for d in g],
        process_is_granule=attribute == "process_index",
        allow_split_physical_axes=devices[0].device_kind in _SPLITTABLE_KINDS,
    )


STRICT_SETTINGS = ("auto", "on", "off")


def resolve_strict(setting: str, mesh: Mesh | None) -> bool:
    """`ModelConfig.strict_sharding`: "on", "off", or "auto" = on unless the mesh is CPU devices (a CPU
    test mesh may not divide a real model's heads; a TPU or GPU pod should never silently replicate)."""
    if setting not in STRICT_SETTINGS:
        raise ValueError(f"strict_sharding must be one of {STRICT_SETTINGS}, got {setting!r}")
    if setting == "auto":
        return mesh is not None and mesh.devices.flat[0].platform != "cpu"
    return setting == "on"


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules=None,
    *,
    strict: bool = False,
    name: str = "array",
) -> P:
    """Map logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis that does not divide the dimension (or is already used by an
    earlier dimension) is dropped, so e.g. 2 kv heads on a 4-way tensor axis are replicated instead of
    failing. `strict`: a rule dropped because its axis does not divide raises instead, naming `name`, the
    logical axis and the mesh axis (a silently replicated weight or cache costs the axis's size in memory).
    """
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for dim, logical_name in enumerate(logical):
        target = table.get(logical_name) if logical_name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = math.prod(mesh.shape[a] for a in kept + [axis])
                if shape[dim] % size:
                    if strict and mesh.shape[axis] > 1:
                        raise ValueError(
                            f"{name}: logical axis {logical_name!r} ({shape[dim]}) does not divide over "
                            f"mesh axis {axis!r} ({dict(mesh.shape)}), so it would be replicated on every "
                            f"{axis!r} device; change the mesh, or set config.model.strict_sharding='off'"
                        )
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*spec)


def param_shardings(mesh: Mesh, axes_tree, shapes_tree, rules=None, *, strict: bool = False):
    """NamedSharding for every parameter from its logical axes and shape (`strict`: see
    `logical_to_spec`; the error names the parameter's path)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, axes, shape: NamedSharding(
            mesh, logical_to_spec(axes, shape, mesh, rules, strict=strict, name=jax.tree_util.keystr(path))
        ),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_spec(ndim: int) -> P:
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: leading dim over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch's rows are split over: the product of the BATCH_AXES ("data", "fsdp") sizes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (pytree of numpy arrays holding THIS process's rows) on the mesh.

    Single process: the arrays are the global batch. Multi-host: each process passes its slice and
    `jax.make_array_from_process_local_data` assembles the global array, the slice filling this process's
    rows in order (`process_rows`: not necessarily one contiguous block). Scalars are replicated.
    """

    def place(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        sharding = batch_sharding(mesh, x.ndim)
        data_parallel = data_parallel_size(mesh)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % data_parallel:
            raise ValueError(
                f"batch dimension {global_rows} is not divisible by the data-parallel size {data_parallel} "
                f"(mesh {dict(mesh.shape)})"
            )
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(place, batch)


def to_host(tree):
    """Fetch a pytree of arrays to host numpy, whole: every process gets every row, in the global
    order. An array split over devices of other processes is gathered first (`process_allgather`, a
    collective: every process must call this together); addressable and replicated arrays are read
    directly. Per-row host work should read only this process's rows instead (`local_rows`)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(fetch, tree)


def place_global(tree, mesh: Mesh):
    """Place host arrays that hold the GLOBAL batch (the same values on every process, e.g. a batch
    every process built from the same seed) on the mesh, rows split over the batch axes; each process
    keeps only its devices' rows. Arrays whose rows do not split evenly are replicated."""

    def place(x):
        x = np.asarray(x)
        rows = data_parallel_size(mesh)
        sharding = batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] % rows == 0 else replicated(mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


# ---------------------------------------------------------------------------------------------------
# This process's rows. Under the batch layout a process's devices hold several row blocks, which are one
# contiguous run of the global batch only when the mesh happens to list the devices process by process
# (a topology-aware or multislice mesh need not). Host-side work per row (decoding, host rewards, step
# rewards) reads those rows with their global row numbers, and writes its results back the same way.
# ---------------------------------------------------------------------------------------------------


def process_rows(mesh: Mesh, num_rows: int, devices=None) -> np.ndarray:
    """Global row numbers int64 [n] (ascending) that `devices` hold of a [num_rows, ...] array in the
    batch layout. `devices` defaults to this process's devices of the mesh; a test passes a subset to
    stand in for one process of a pod."""
    devices = mesh.local_devices if devices is None else list(devices)
    index_map = batch_sharding(mesh, 1).devices_indices_map((num_rows,))
    blocks = {}
    for device in devices:
        start, stop, _ = index_map[device][0].indices(num_rows)
        blocks[start] = stop
    return np.concatenate([np.arange(start, blocks[start]) for start in sorted(blocks)]).astype(np.int64)


def local_rows(tree, mesh: Mesh, devices=None):
    """(rows, values): this process's rows of a pytree of [N, ...] arrays and their global row numbers.

    rows: int64 [n], ascending (`process_rows`); values: the tree with numpy [n, ...] leaves, row i of
    each being global row rows[i]. The rows are read from the addressable shards, without
    communication, once the arrays are in the batch layout (one laid out otherwise is resharded first,
    which is a collective). `devices` as in `process_rows`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        raise ValueError("local_rows: no arrays")
    num_rows = leaves[0].shape[0]
    devices = mesh.local_devices if devices is None else list(devices)
    rows = process_rows(mesh, num_rows, devices)

    def read(x):
        if x.shape[0] != num_rows:
            raise ValueError(f"local_rows: arrays with {x.shape[0]} and {num_rows} rows")
        target = batch_sharding(mesh, x.ndim)
        if not isinstance(x, jax.Array) or not x.sharding.is_equivalent_to(target, x.ndim):
            x = jax.device_put(x, target)
        wanted = set(devices)
        blocks = {}
        for shard in x.addressable_shards:
            if shard.device in wanted:
                start = shard.index[0].indices(num_rows)[0]
                if start not in blocks:
                    blocks[start] = np.asarray(shard.data)
        return np.concatenate([blocks[start] for start in sorted(blocks)])

    return rows, jax.tree_util.tree_unflatten(treedef, [read(x) for x in leaves])


def from_local_rows(tree, rows: np.ndarray, mesh: Mesh, num_rows: int):
    """Global [num_rows, ...] arrays in the batch layout from this process's rows of them: `rows` and the
    tree's [n, ...] leaves as `local_rows` returns them (every process passes its own rows)."""
    expected = process_rows(mesh, num_rows)
    if not np.array_equal(np.asarray(rows), expected):
        raise ValueError(
            f"from_local_rows: got rows {np.asarray(rows)[:8].tolist()}..., this process holds "
            f"{expected[:8].tolist()}... of {num_rows}"
        )

    def place(x):
        x = np.asarray(x)
        if x.shape[0] != len(expected):
            raise ValueError(f"from_local_rows: {x.shape[0]} values for {len(expected)} rows")
        shape = (num_rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)

    return jax.tree_util.tree_map(place, tree)


def allgather_objects(obj) -> list:
    """Every process's `obj` (picklable), in process order: [obj] in a single process. A collective:
    every process must call it together. For small host results (a few numbers or strings per row)
    that every process needs, where the rows themselves stay put."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[p, : sizes[p]].tobytes()) for p in range(len(sizes))]


def sum_over_processes(values: Mapping[str, float]) -> dict[str, float]:
    """Each entry summed over the processes (float64; the entries themselves in a single process), e.g.
    sums and row counts of host-computed values, for means over the global batch. A collective."""
    totals = {k: 0.0 for k in values}
    for part in allgather_objects({k: float(v) for k, v in values.items()}):
        for k, v in part.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def initialize_distributed(**kwargs) -> None:
    """Start JAX's multi-controller runtime on a multi-host TPU/GPU slice; a no-op for a single process.

    On Cloud TPU all arguments are discovered automatically; elsewhere pass coordinator_address,
    num_processes and process_id (forwarded to `jax.distributed.initialize`).
    """
    if jax.distributed.is_initialized():  # scripts/train.py may have started it with explicit arguments
        return
    if kwargs or _looks_multihost():
        jax.distributed.initialize(**kwargs)


def _looks_multihost() -> bool:
    import os

    return any(
        os.environ.get(k)
        for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    ) and os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost")
