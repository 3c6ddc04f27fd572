"""Meshes and shardings: logical layout of arrays over devices, in one place.

The data-parallel layout used by the pipelines: a 1-D mesh over every local device with axis
``"data"``; batches are split along their first axis, parameters and optimizer state replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices).

  The axis is ``Auto``: jit's in/out shardings fix the layout at the boundary and the compiler
  propagates it inside (the pjit model).
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the ``"data"`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise ValueError(f"{name}={batch_size} must be a multiple of the {devices} devices on the "
                     f"'{DATA_AXIS}' mesh axis")
