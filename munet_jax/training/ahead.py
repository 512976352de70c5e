"""Compiling the training steps on a thread while the data is being prepared.

Compiling a step takes tens of seconds on a CPU, and so does making or reading the data;
the one mostly uses one core and the other can use the rest. `AheadOfTime` starts the
compile at once, for the shapes and shardings the run will call the step with, and the
loop calls it like the jitted function: the first call waits for the compile, and any
call whose arguments differ from what was compiled (another dtype, a restored state laid
out otherwise) goes to the jitted function, which compiles for itself as before. Either
way the computation is the same program.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from munet_jax import sharding

log = logging.getLogger(__name__)


def _signature(tree) -> tuple:
  leaves, structure = jax.tree.flatten(tree)
  return structure, tuple((tuple(x.shape), np.dtype(x.dtype), bool(getattr(x, "weak_type", False)),
                           x.sharding) for x in leaves)


class AheadOfTime:
  """`jitted` (a `jax.jit` function) compiled on a thread for arguments like `abstract`.

  Args:
    jitted: the jitted function; what a call with other arguments runs.
    abstract: arguments as `jax.ShapeDtypeStruct`s with their shardings (or arrays).
    after: an `AheadOfTime` whose compile should finish first (one core compiles).
  """

  def __init__(self, jitted: Callable, *abstract: Any, after: AheadOfTime | None = None):
    self._jitted = jitted
    self._compiled = None
    self.compiled_calls = 0   # calls the ahead-of-time executable served
    self._signature = _signature(abstract)
    self._thread = threading.Thread(target=self._compile, args=(abstract, after),
                                    name="compile-ahead", daemon=True)
    self._thread.start()

  def _compile(self, abstract, after) -> None:
    if after is not None:
      after.wait()
    try:
      self._compiled = self._jitted.lower(*abstract).compile()
    except Exception as e:   # the jitted function compiles for itself on the first call
      log.info("compiling ahead failed (%s: %s); compiling on the first step instead",
               type(e).__name__, e)

  def wait(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __call__(self, *args):
    self.wait()
    if self._compiled is not None and _signature(args) == self._signature:
      self.compiled_calls += 1
      return self._compiled(*args)
    return self._jitted(*args)


def abstract_train_args(state, config: ml_collections.ConfigDict, mesh,
                        padded_batch: int) -> tuple:
  """(state, batch) as `ShapeDtypeStruct`s: the state as placed (its static fields too,
  which the compiled step is keyed on), the batch as the loop places it (int16 Hounsfield
  units, int32 labels, the row mask, split over the mesh)."""
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                      weak_type=x.weak_type), state)
  rows, size = padded_batch, config.data.image_size
  split = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((rows, size, size, 1), np.int16, sharding=split),
           "label": jax.ShapeDtypeStruct((rows, size, size), np.int32, sharding=split),
           "mask": jax.ShapeDtypeStruct((rows,), np.bool_, sharding=split)}
  return state, batch
