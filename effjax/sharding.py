"""Meshes and shardings: logical layout of arrays over devices, in one place.

* Meshes: :func:`data_parallel_mesh` (1-D ``"data"`` over every device, the quickstart layout) or
  :func:`make_mesh` from a :class:`MeshConfig` (named axes and sizes, e.g. ``data=2, fsdp=4``).
  Axes are ``Auto``: jit's in/out shardings fix the layout at the boundary and the compiler
  propagates it inside (the pjit model).
* Logical axes: :data:`LOGICAL_AXIS_RULES` maps the layouts effjax uses (``"batch"``: the leading
  axis of a batch; ``"state"``: the axis a ZeRO-sharded leaf is split over) to mesh axes. A rule
  names several mesh axes; those absent from a mesh are dropped (:func:`mesh_axes`).
* Pytrees: :func:`state_partition_spec` splits the largest dimension of a leaf that the state
  axes divide; scalars and leaves with no divisible dimension stay replicated.
  :func:`tree_shardings` applies it to every leaf of a pytree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
SEQ_AXIS = "seq"  # sequence parallelism (effjax.ring_attention, effjax.nn.SequenceParallel)

# Logical layout -> mesh axes (major to minor); mesh axes a mesh lacks are skipped.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": (DATA_AXIS, FSDP_AXIS),   # examples of a batch
    "state": (DATA_AXIS, FSDP_AXIS),   # ZeRO: optimizer state, gradients, parameters
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Named mesh axes and their sizes, e.g. ``axis_names=("data", "fsdp"), axis_sizes=(2, 4)``."""
  axis_names: tuple[str, ...] = (DATA_AXIS,)
  """Mesh axis names, major to minor (effjax uses 'data', 'fsdp' and 'tensor')."""
  axis_sizes: tuple[int, ...] = (-1,)
  """Size of each axis; one may be -1: all the devices the others leave."""

  def __post_init__(self):
    if len(self.axis_names) != len(self.axis_sizes) or not self.axis_names:
      raise ValueError(f"axis_names={self.axis_names} and axis_sizes={self.axis_sizes} must be "
                       "non-empty and of equal length")
    if len(set(self.axis_names)) != len(self.axis_names):
      raise ValueError(f"axis_names={self.axis_names} must be distinct")
    if any(s == 0 or s < -1 for s in self.axis_sizes) or list(self.axis_sizes).count(-1) > 1:
      raise ValueError(f"axis_sizes={self.axis_sizes} must be positive, with at most one -1")


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with ``config``'s axes; ``Auto`` axis types.

  Raises:
    ValueError: the sizes do not multiply to the device count (or -1 cannot fill it).
  """
  devices = list(jax.devices() if devices is None else devices)
  known = math.prod(s for s in config.axis_sizes if s != -1)
  sizes = tuple(len(devices) // known if s == -1 else s for s in config.axis_sizes)
  if math.prod(sizes) != len(devices):
    raise ValueError(f"axis_sizes={config.axis_sizes} for axes {config.axis_names} must multiply "
                     f"to the {len(devices)} devices")
  return jax.make_mesh(sizes, config.axis_names, devices=devices,
                       axis_types=(AxisType.Auto,) * len(sizes))


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices)."""
  return make_mesh(MeshConfig(), devices)


def mesh_axes(mesh: Mesh, logical: str) -> tuple[str, ...]:
  """The mesh axes that carry the ``logical`` layout (see :data:`LOGICAL_AXIS_RULES`).

  Raises:
    ValueError: ``logical`` has no rule, or the mesh has none of its axes.
  """
  if logical not in LOGICAL_AXIS_RULES:
    raise ValueError(f"logical axis {logical!r} has no rule; known: {sorted(LOGICAL_AXIS_RULES)}")
  axes = tuple(a for a in LOGICAL_AXIS_RULES[logical] if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} include none of {LOGICAL_AXIS_RULES[logical]} "
                     f"needed for the {logical!r} layout")
  return axes


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  """Devices along ``axes`` of ``mesh`` (the product of their sizes)."""
  return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: Sequence[str]) -> str | tuple[str, ...]:
  return axes[0] if len(axes) == 1 else tuple(axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, *trailing: str | None) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh's ``"batch"`` axes (data, then fsdp), and the
  next axes over ``trailing`` (e.g. ``SEQ_AXIS`` for sequence parallelism)."""
  return NamedSharding(mesh, PartitionSpec(_spec_entry(mesh_axes(mesh, "batch")), *trailing))


def check_batch_divisible(batch_size: int, mesh: Mesh, name: str = "batch_size",
                          multiple_of: int = 1) -> None:
  """Raises ValueError unless ``batch_size`` splits over the batch axes (times ``multiple_of``)."""
  axes = mesh_axes(mesh, "batch")
  devices = axes_size(mesh, axes)
  if batch_size % (devices * multiple_of):
    where = f"'{axes[0]}' mesh axis" if len(axes) == 1 else f"mesh axes {axes}"
    extra = f" times {multiple_of} micro-batches" if multiple_of > 1 else ""
    raise ValueError(f"{name}={batch_size} must be a multiple of the {devices} devices on the "
                     f"{where}{extra}")


def state_partition_spec(shape: Sequence[int], mesh: Mesh,
                         axes: Sequence[str] | None = None) -> PartitionSpec:
  """The ZeRO layout of one leaf: its largest dimension divisible by the ``axes`` devices is split.

  Ties go to the later dimension (a leading stacked-layer axis of equal size stays whole). Scalars
  and leaves with no divisible dimension are replicated (``PartitionSpec()``).

  Args:
    shape: the leaf's shape.
    mesh: the mesh.
    axes: mesh axes to split over (default: the ``"state"`` rule's axes present in ``mesh``).
  """
  axes = mesh_axes(mesh, "state") if axes is None else tuple(axes)
  devices = axes_size(mesh, axes)
  candidates = [d for d, size in enumerate(shape) if size >= devices and size % devices == 0]
  if not candidates or devices == 1:
    return PartitionSpec()
  dim = max(candidates, key=lambda d: (shape[d], d))
  return PartitionSpec(*([None] * dim), _spec_entry(axes))


def sharded_dim(spec: PartitionSpec) -> int | None:
  """The dimension a :func:`state_partition_spec` splits, or None when replicated."""
  dims = [d for d, entry in enumerate(spec) if entry is not None]
  return dims[0] if dims else None


def tree_shardings(tree: Any, mesh: Mesh, *, shard: bool = True,
                   axes: Sequence[str] | None = None,
                   memory_kind: str | None = None) -> Any:
  """A NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs).

  Args:
    tree: the pytree whose leaves' shapes decide the layout.
    mesh: the mesh.
    shard: split leaves by :func:`state_partition_spec` (False: replicate every leaf).
    axes: mesh axes to split over (default: the ``"state"`` rule's axes).
    memory_kind: e.g. ``"pinned_host"`` to keep the leaves in host memory.
  """
  def leaf_sharding(leaf):
    spec = state_partition_spec(leaf.shape, mesh, axes) if shard else PartitionSpec()
    return NamedSharding(mesh, spec, memory_kind=memory_kind)
  return jax.tree.map(leaf_sharding, tree)
