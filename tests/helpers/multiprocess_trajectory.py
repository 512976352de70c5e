"""One process of a 2-process CPU run of three training steps (or the 1-process reference).

  python multiprocess_trajectory.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Each process feeds only its own rows of the global batch; process 0 writes the final
parameters to OUT.npz.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(out, coordinator=None, num_processes=1, process_id=0):
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  from munet_jax.config import base_config
  from munet_jax.runtime import configure_jax
  from munet_jax.training import parallel
  from munet_jax.training.state import create_train_state, make_train_step
  configure_jax()
  c = base_config()
  c.model.features = (4, 8)
  c.train.batch_size = 3
  c.train.learning_rate = 1e-3
  mesh = parallel.make_mesh()
  padded = parallel.padded_batch_size(3, mesh.devices.size)
  rows = padded // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  state = jax.device_put(create_train_state(c, jax.random.key(0)), parallel.replicated(mesh))
  step = jax.jit(make_train_step(c), out_shardings=(parallel.replicated(mesh),) * 2)
  rng = np.random.default_rng(0)
  for _ in range(3):
    image = rng.normal(size=(3, 16, 16, 1)).astype(np.float32)
    label = rng.integers(0, 3, (3, 16, 16)).astype(np.int32)
    pad = padded - 3
    batch = dict(image=np.concatenate([image, np.zeros((pad, 16, 16, 1), np.float32)]),
                 label=np.concatenate([label, np.zeros((pad, 16, 16), np.int32)]),
                 mask=np.arange(padded) < 3)
    local = {k: v[mine] for k, v in batch.items()}
    state, metrics = step(state, parallel.global_batch_from_local(local, mesh))
  leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats)))
  if jax.process_index() == 0:
    np.savez(out, params=np.concatenate([np.ravel(x) for x in leaves]),
             loss=float(metrics["loss"]), devices=mesh.devices.size)


if __name__ == "__main__":
  main(*sys.argv[1:])
