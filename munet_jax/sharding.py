"""Data parallelism: one mesh axis over every device of every host, named shardings.

The global batch is split along the batch axis; parameters are replicated. XLA inserts
the gradient all-reduce and the cross-device batch-norm statistics from the shardings;
nothing is written by hand.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def padded_batch_size(global_batch: int, num_devices: int) -> int:
  """The smallest multiple of the device count that holds the global batch (15 -> 16 on 4)."""
  return math.ceil(global_batch / num_devices) * num_devices


def global_batch_from_local(local: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run; nothing with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
