"""Process-wide settings, applied once by the command-line tools and the tests."""

from __future__ import annotations

import logging
import os

import jax

from munet_jax.errors import UserError


def configure_jax() -> None:
  """Settings that make JAX practical on the machines we run on.

  On the CPU, XLA compiles the partitionable Threefry generator very slowly for small
  shapes (about 35 s to initialise a tiny mU-Net, against 4 s without it, jax 0.10). The
  partitionable form only matters for generating random bits inside sharded programs on
  accelerators, so it stays on there. Random values differ between the two forms, not
  their distribution; a run is reproducible on the platform it ran on.
  """
  if jax.default_backend() == "cpu":
    jax.config.update("jax_threefry_partitionable", False)


def configure_logging() -> None:
  """Warnings as 'LEVEL: message' lines; the libraries' routine chatter kept off stderr."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_devices: str | None = None) -> None:
  """Starts JAX's multi-process runtime: from flags, or from SLURM / TPU when they set it.

  `local_devices` is a comma-separated list of this process's device ids.
  """
  explicit = coordinator is not None or num_processes is not None
  if explicit:
    if coordinator is None or num_processes is None or process_id is None:
      raise UserError("--coordinator, --num-processes and --process-id go together")
    local = None
    if local_devices:
      local = [int(d) for d in local_devices.split(",")]
    # CPU processes need a collectives library of their own (GPUs and TPUs ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=local)
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()
