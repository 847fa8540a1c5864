"""The device mesh: axes `data`, `fsdp`, `tensor`, sized from `config.mesh`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from genctl_jax.configlib import MESH_AXES
from genctl_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves `config.mesh` (one axis may be -1) against the device count."""
    unknown = sorted(set(mesh_config.keys()) - set(MESH_AXES))
    if unknown:
        raise ConfigError(
            f"config.mesh has unknown axes {unknown}; the mesh axes are {', '.join(MESH_AXES)}"
        )
    sizes = {axis: mesh_config.get(axis, 1) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(
                f"config.mesh.{axis}={size!r}: expected a positive integer, or -1 to fill"
            )
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh={_describe(sizes)}: the fixed axes ({fixed} devices) do not "
                f"divide the {num_devices} devices present; choose sizes whose product "
                f"divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh={_describe(sizes)} needs {fixed} devices but {num_devices} are "
            f"present; make the product equal {num_devices} or set one axis to -1"
        )
    return sizes


def _describe(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in sizes.items())


def create_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds the mesh over `devices` (default: all), with Auto axis types (GSPMD sharding)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
