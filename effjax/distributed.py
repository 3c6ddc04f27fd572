"""Multi-process (multi-host) runs: join the JAX runtime, assemble global batches, log once.

On a cluster every host runs the same program; :func:`initialize` joins them into one JAX runtime
(after it, ``jax.devices()`` lists every host's devices and a mesh over them spans hosts). Each
process loads only its share of a batch; :func:`global_batch` assembles the shares into one global
array sharded over the mesh (``jax.make_array_from_process_local_data``). Only process 0 should
write logs (:func:`is_main_process`); orbax checkpointing is collective (every process calls it).

On CPU, collectives between processes use gloo. Launch (two hosts, or two shells on one)::

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import PyTree


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Where the coordinator is and who this process is; None fields come from the environment."""
  coordinator_address: str | None = None
  """host:port of process 0 (else $JAX_COORDINATOR_ADDRESS; neither: a single-process run)."""
  num_processes: int | None = None
  """Processes in the run (else $JAX_NUM_PROCESSES)."""
  process_id: int | None = None
  """This process's rank in [0, num_processes) (else $JAX_PROCESS_ID)."""


def initialize(config: DistributedConfig = DistributedConfig()) -> bool:
  """Joins the multi-process runtime if a coordinator is configured; returns whether it did.

  Call before anything touches a device. Sets gloo collectives for the CPU backend.

  Raises:
    ValueError: a coordinator without a valid process count and id.
  """
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return False
  count = _setting(config.num_processes, "JAX_NUM_PROCESSES", "num_processes")
  rank = _setting(config.process_id, "JAX_PROCESS_ID", "process_id")
  if count < 1 or not 0 <= rank < count:
    raise ValueError(f"process_id={rank} must be in [0, num_processes={count})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=rank)
  return True


def _setting(value: int | None, variable: str, name: str) -> int:
  if value is not None:
    return value
  if variable not in os.environ:
    raise ValueError(f"a coordinator address is set but {name} is not: set it in the config or "
                     f"${variable}")
  return int(os.environ[variable])


def is_main_process() -> bool:
  """True on process 0, the one that writes logs and prints."""
  return jax.process_index() == 0


def process_share(batch: PyTree) -> PyTree:
  """This process's consecutive rows of a full batch (leaves ``[batch, ...]``, numpy).

  For pipelines whose every process can compute the whole batch cheaply (token windows indexed by
  step): process ``i`` keeps rows ``[i * batch / count, (i + 1) * batch / count)``.

  Raises:
    ValueError: a leaf's rows do not split evenly over the processes.
  """
  count, index = jax.process_count(), jax.process_index()

  def take(x):
    rows = len(x)
    if rows % count:
      raise ValueError(f"batch of {rows} rows must split evenly over {count} processes")
    share = rows // count
    return np.asarray(x)[index * share:(index + 1) * share]
  return jax.tree.map(take, batch)


def global_batch(local: PyTree, sharding: NamedSharding) -> Any:
  """Global arrays from each process's rows of a batch (leaves ``[local_batch, ...]``).

  Every process passes its own share; the shares are concatenated in the order of the processes'
  devices along the sharded axis (process order, for meshes from ``jax.make_mesh``).
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
