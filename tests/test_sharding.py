"""Meshes on the 8 fake CPU devices: `sharding.make_mesh` is `jax.make_mesh` with automatic axes for one
slice, and lays a multislice mesh out slice by slice (`hybrid_device_array`, checked with fake devices
that carry a `slice_index`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from grpo_jax import sharding

# (data, fsdp) row block k lives on mesh[k // 2, k % 2, :]; this order puts devices 0-3 (a "process") on
# blocks 0 and 2 and devices 4-7 on blocks 1 and 3: no block follows its devices' ids.
PERMUTED = (0, 1, 4, 5, 2, 3, 6, 7)


def permuted_mesh():
    return sharding.make_mesh((2, 2, 2), devices=[jax.devices()[i] for i in PERMUTED])


# ------------------------------------------------------------------------------------------------
# Meshes
# ------------------------------------------------------------------------------------------------


def test_one_slice_mesh_is_jax_make_mesh_with_automatic_axes():
    mesh = sharding.make_mesh((2, -1, 2))
    want = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in want.devices.flat]
    # jax.make_mesh's own default is Explicit axes, which would change how every program is sharded.
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert [d.id for d in permuted_mesh().devices.flat] == list(PERMUTED)  # given devices keep their order
    assert sharding.make_mesh((2, 2, 2), dcn_shape=(1, 1, 1)).devices.tolist() == mesh.devices.tolist()


@dataclasses.dataclass(frozen=True)
class FakeHostDevice:
    """A device without `slice_index` (GPU, CPU): slices are its host's devices."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeHostDevice):
    """A multislice TPU device stand-in."""

    slice_index: int = 0


def test_multislice_mesh_puts_each_slice_on_its_block_of_the_dcn_axes():
    # 2 slices of 4 devices, listed interleaved: grouping is by slice_index, not by position.
    devices = [FakeSliceDevice(id=i, process_index=i // 2, slice_index=i % 2) for i in range(8)]
    slice_of = np.vectorize(lambda d: d.slice_index)

    data_over_slices = sharding.hybrid_device_array((4, 1, 2), (2, 1, 1), devices)
    assert data_over_slices.shape == (4, 1, 2)
    assert (slice_of(data_over_slices[:2]) == 0).all() and (slice_of(data_over_slices[2:]) == 1).all()

    fsdp_over_slices = sharding.hybrid_device_array((2, 2, 2), (1, 2, 1), devices)
    assert (slice_of(fsdp_over_slices[:, 0]) == 0).all() and (slice_of(fsdp_over_slices[:, 1]) == 1).all()
    assert sorted(d.id for d in fsdp_over_slices.flat) == list(range(8))

    hosts = [FakeHostDevice(id=i, process_index=i // 4) for i in range(8)]  # no slice_index: by host
    one_slice = [FakeSliceDevice(id=i, process_index=i // 4, slice_index=0) for i in range(8)]  # CPU's
    for devices in (hosts, one_slice):
        by_host = sharding.hybrid_device_array((2, 2, 2), (2, 1, 1), devices)
        assert [d.process_index for d in by_host[0].flat] == [0] * 4
        assert [d.process_index for d in by_host[1].flat] == [1] * 4


def test_multislice_mesh_errors_are_one_clear_line():
    devices = [FakeSliceDevice(id=i, process_index=0, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match=r"span 2 slices: give a dcn mesh shape \(config.dcn_mesh\)"):
        sharding.make_mesh((2, 2, 2), devices=devices)
    with pytest.raises(ValueError, match="needs 4 slices but the 8 devices form 2 .grouped by slice_index"):
        sharding.make_mesh((4, 2, 1), devices=devices, dcn_shape=(4, 1, 1))
    with pytest.raises(ValueError, match="must divide the mesh shape"):
        sharding.make_mesh((2, 4, 1), devices=devices, dcn_shape={"data": 1, "fsdp": 3})
    with pytest.raises(ValueError, match="dcn mesh shape: unknown axis name"):
        sharding.make_mesh((2, 4, 1), devices=devices, dcn_shape={"slice": 2})
    # The 8 CPU devices of this one process form one host, hence one "slice".
    with pytest.raises(ValueError, match="needs 2 slices but the 8 devices form 1 .grouped by process_index"):
        sharding.make_mesh((2, 2, 2), dcn_shape=(2, 1, 1))
