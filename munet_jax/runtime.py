"""Process-wide settings, applied once by the command-line tools and the tests."""

from __future__ import annotations

import logging

import jax


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
