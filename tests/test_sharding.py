"""Meshes from config, logical-axis rules, and the ZeRO layout of pytree leaves."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from effjax import sharding


def test_mesh_from_config_fills_the_minus_one_axis():
  mesh = sharding.make_mesh(sharding.MeshConfig(("data", "fsdp", "tensor"), (2, -1, 2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_axes(mesh, "batch") == ("data", "fsdp")
  assert sharding.batch_sharded(mesh).spec == P(("data", "fsdp"))
  assert sharding.batch_sharded(sharding.data_parallel_mesh()).spec == P("data")


@pytest.mark.parametrize("names, sizes, match", [
    (("data",), (3,), r"axis_sizes=\(3,\) for axes \('data',\) must multiply to the 8 devices"),
    (("data", "data"), (2, 4), r"must be distinct"),
    (("data", "fsdp"), (-1, -1), r"at most one -1"),
    (("data",), (2, 4), r"equal length"),
])
def test_bad_mesh_config_is_a_clear_error(names, sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(sharding.MeshConfig(names, sizes))


def test_state_layout_splits_the_largest_divisible_dimension():
  mesh = sharding.make_mesh(sharding.MeshConfig(("data", "fsdp"), (2, 4)))
  spec = lambda *shape: sharding.state_partition_spec(shape, mesh)
  assert spec(16, 64) == P(None, ("data", "fsdp"))
  assert spec(64, 12) == P(("data", "fsdp"))           # 12 is not divisible by 8
  assert spec(32, 32) == P(None, ("data", "fsdp"))     # ties: the later dimension
  assert spec(5) == P() and spec() == P() and spec(4, 4) == P()   # replicated
  assert sharding.state_partition_spec((16,), mesh, axes=("fsdp",)) == P("fsdp")
  assert sharding.sharded_dim(spec(16, 64)) == 1 and sharding.sharded_dim(P()) is None
  tree = {"w": jax.ShapeDtypeStruct((16, 12), jnp.float32), "count": jnp.zeros((), jnp.int32)}
  shardings = sharding.tree_shardings(tree, mesh, memory_kind="pinned_host")
  assert shardings["w"].spec == P(("data", "fsdp")) and shardings["count"].spec == P()
  assert shardings["w"].memory_kind == "pinned_host"
  assert sharding.tree_shardings(tree, mesh, shard=False)["w"].spec == P()


def test_missing_logical_axes_are_a_clear_error():
  mesh = sharding.make_mesh(sharding.MeshConfig(("tensor",), (8,)))
  with pytest.raises(ValueError, match=r"mesh axes \('tensor',\) include none of"):
    sharding.batch_sharded(mesh)
  with pytest.raises(ValueError, match=r"logical axis 'heads' has no rule"):
    sharding.mesh_axes(mesh, "heads")
