"""One process of a 2-process CPU run of three training steps (or the 1-process reference).

  python multiprocess_trajectory.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Each process feeds only its own rows of the global batch; process 0 writes the final
parameters to OUT.npz. In float64, for the reason tests/helpers/device_trajectory.py gives.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(out, coordinator=None, num_processes=1, process_id=0):
  jax.config.update("jax_enable_x64", True)
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from munet_jax.config import base_config
  from munet_jax.runtime import configure_jax
  from munet_jax import sharding
  from munet_jax.training.state import create_train_state, make_train_step
  configure_jax()
  c = base_config()
  c.model.features = (4, 8)
  c.train.batch_size = 3
  c.train.learning_rate = 1e-3
  c.model.dtype = "float64"    # not a user setting: this check alone enables x64
  mesh = sharding.make_mesh()
  padded = sharding.padded_batch_size(3, mesh.devices.size)
  rows = padded // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  state = jax.tree_util.tree_map(
      lambda x: x.astype(np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
      create_train_state(c, jax.random.key(0)))
  state = jax.device_put(state, sharding.replicated(mesh))
  step = jax.jit(make_train_step(c), out_shardings=(sharding.replicated(mesh),) * 2)
  rng = np.random.default_rng(0)
  for _ in range(3):
    image = rng.normal(size=(3, 16, 16, 1))
    label = rng.integers(0, 3, (3, 16, 16)).astype(np.int32)
    pad = padded - 3
    batch = dict(image=np.concatenate([image, np.zeros((pad, 16, 16, 1))]),
                 label=np.concatenate([label, np.zeros((pad, 16, 16), np.int32)]),
                 mask=np.arange(padded) < 3)
    local = {k: v[mine] for k, v in batch.items()}
    state, metrics = step(state, sharding.global_batch_from_local(local, mesh))
  leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats)))
  if jax.process_index() == 0:
    np.savez(out, params=np.concatenate([np.ravel(x) for x in leaves]),
             loss=float(metrics["loss"]), devices=mesh.devices.size)


if __name__ == "__main__":
  main(*sys.argv[1:])
