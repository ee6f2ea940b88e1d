"""Build a ``jax.sharding.Mesh`` with axes (data, fsdp, tensor, expert, stage) from config.

Sizes come from the config's ``mesh`` section; one axis may be ``-1`` to take the devices left over.
Multi-slice (DCN) sizes multiply the in-slice (ICI) sizes, as in MaxText: ``mesh.dcn_data=2`` with
``mesh.data=4`` gives a data axis of 8 whose outer factor crosses slices. Axes are ``AxisType.Auto``: the
model is sharded by ``jit`` in/out shardings and ``with_sharding_constraint`` (the MaxText style), so eager
code and single-device code keep working unchanged.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llmopt_jax.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
    """Axis sizes in ``MESH_AXES`` order with a single ``-1`` filled so the product is ``num_devices``."""
    values = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    described = ", ".join(f"{a}={v}" for a, v in zip(MESH_AXES, values))
    if any(v == 0 or v < -1 for v in values):
        raise MeshError(f"{what} axis sizes must be positive or -1, got {described}")
    fills = [i for i, v in enumerate(values) if v == -1]
    if len(fills) > 1:
        raise MeshError(f"at most one {what} axis may be -1, got {described}")
    known = math.prod(v for v in values if v != -1)
    if fills:
        if num_devices % known:
            raise MeshError(
                f"{what} axes ({described}) cannot fill {num_devices} devices: {known} does not divide {num_devices}"
            )
        values[fills[0]] = num_devices // known
    if math.prod(values) != num_devices:
        raise MeshError(
            f"{what} axes ({described}) use {math.prod(values)} devices but {num_devices} are available"
        )
    return tuple(values)


def create_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes ``MESH_AXES``; sizes from ``mesh_cfg``.

    ``mesh_cfg`` keys: the axis names (in-slice sizes) and ``dcn_<axis>`` (across slices, default 1).
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = tuple(int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES)
    if any(v < 1 for v in dcn):
        raise MeshError(f"dcn mesh sizes must be positive, got {dict(zip(MESH_AXES, dcn))}")
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise MeshError(f"{len(devices)} devices do not split into {num_slices} slices (dcn sizes {dcn})")
    ici = resolve_axis_sizes({a: mesh_cfg.get(a, 1) for a in MESH_AXES}, len(devices) // num_slices)
    if num_slices > 1:
        if not all(hasattr(d, "slice_index") for d in devices):
            raise MeshError(f"dcn mesh sizes {dcn} need multi-slice devices, but {devices[0].platform} devices have none")
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topology-aware placement only exists for some platforms; a plain reshape is always valid.
            device_array = np.asarray(devices).reshape(ici)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """``data=2 fsdp=2 tensor=2 expert=1 stage=1`` for logs."""
    return " ".join(f"{name}={size}" for name, size in mesh.shape.items())
