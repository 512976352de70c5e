"""Trains a tiny mU-Net for a few steps on meshes of 1, 2, 3, 4 and 8 host devices.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8; prints one JSON line:
{n_devices: [losses...], ...} and writes the final parameters of each to OUT.npz.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from munet_jax.config import base_config  # noqa: E402
from munet_jax.runtime import configure_jax  # noqa: E402
from munet_jax.training import parallel  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402


def main(out):
  configure_jax()
  c = base_config()
  c.model.features = (4, 8)
  c.model.dropout_rate = 0.2
  c.train.batch_size = 15
  c.train.learning_rate = 1e-3
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.normal(size=(15, 16, 16, 1)).astype(np.float32),
                  label=rng.integers(0, 3, (15, 16, 16)).astype(np.int32)) for _ in range(3)]
  losses, finals = {}, {}
  for n in (1, 2, 3, 4, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    padded = parallel.padded_batch_size(15, n)
    state = jax.device_put(create_train_state(c, jax.random.key(0)), parallel.replicated(mesh))
    step = jax.jit(make_train_step(c), out_shardings=(parallel.replicated(mesh),) * 2)
    losses[n] = []
    for b in batches:
      pad = padded - 15
      local = dict(image=np.concatenate([b["image"], np.full((pad, 16, 16, 1), 50.0, np.float32)]),
                   label=np.concatenate([b["label"], np.zeros((pad, 16, 16), np.int32)]),
                   mask=np.arange(padded) < 15)
      state, metrics = step(state, parallel.global_batch_from_local(local, mesh))
      losses[n].append(float(metrics["loss"]))
    finals[str(n)] = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
        jax.device_get((state.params, state.batch_stats)))])
  np.savez(out, **finals)
  print(json.dumps(losses))


if __name__ == "__main__":
  main(sys.argv[1])
