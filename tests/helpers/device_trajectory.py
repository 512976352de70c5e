"""Trains a tiny mU-Net for a few steps on meshes of 1, 2, 3, 4 and 8 host devices, in float64.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8:

  python device_trajectory.py OUT.npz

Prints one JSON line {run: [loss of each step]} and writes the final parameters of each
run to OUT.npz, for runs "n" (n devices) and "a->b": the first steps on a devices, a
checkpoint, restored on b devices, the rest trained there (resuming on another device
count). Every run is done twice, the second time ("broken:n", "broken:a->b") with every
padding row marked real: the test's proof that it catches another trajectory. The
padding mask is data, so the second pass reuses the first pass's compiled steps.

Why float64: the sharded step differs from the one-device step only in the order of its
sums (the gradient all-reduce, the batch-norm statistics). In float32 Adam turns that
rounding, in gradients that are zero but for rounding, into steps of about the learning
rate, so no bound on the parameters separates rounding from a real difference. In
float64 rounding is ~1e-16 relative, Adam's amplification (|g| / eps, eps = 1e-8) leaves
it far below the test's bound, and a real difference (a padding row counted) stays large.

"""

import json
import os
import shutil
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from munet_jax import sharding  # noqa: E402
from munet_jax.checkpoints import Checkpointer  # noqa: E402
from munet_jax.config import base_config  # noqa: E402
from munet_jax.runtime import configure_jax  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402

BATCH, SIZE, STEPS = 15, 16, 4
RESUMES = ((4, 1), (1, 8), (8, 3), (2, 4))   # (devices before, devices after)


def _config():
  c = base_config()
  c.model.features = (4, 8)
  c.model.dropout_rate = 0.2
  c.model.dtype = "float64"    # not a user setting: this check alone enables x64
  c.train.batch_size = BATCH
  c.train.learning_rate = 1e-3
  return c


def _float64(tree):
  return jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
      else x, tree)


class Run:
  """One config trained on the first n devices."""

  def __init__(self, c, n):
    self.mesh = sharding.make_mesh(jax.devices()[:n])
    self.padded = sharding.padded_batch_size(BATCH, n)
    self.step = jax.jit(make_train_step(c), out_shardings=(sharding.replicated(self.mesh),) * 2)

  def place(self, state):
    return jax.device_put(state, sharding.replicated(self.mesh))

  def train(self, state, batches, losses, broken):
    for b in batches:
      pad = self.padded - BATCH
      mask = np.arange(self.padded) < (self.padded if broken else BATCH)
      local = dict(image=np.concatenate([b["image"], np.full((pad, SIZE, SIZE, 1), 50.0)]),
                   label=np.concatenate([b["label"], np.zeros((pad, SIZE, SIZE), np.int32)]),
                   mask=mask)
      state, metrics = self.step(state, sharding.global_batch_from_local(local, self.mesh))
      losses.append(float(metrics["loss"]))
    return state


def _flat(state):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
      jax.device_get((state.params, state.batch_stats)))])


def main(out):
  configure_jax()
  c = _config()
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.normal(size=(BATCH, SIZE, SIZE, 1)),
                  label=rng.integers(0, 3, (BATCH, SIZE, SIZE)).astype(np.int32))
             for _ in range(STEPS)]
  fresh = _float64(create_train_state(c, jax.random.key(0)))
  # A restored step counter is a strongly typed int; so is this one, or the first step
  # after each restore would compile again.
  fresh = fresh.replace(step=jnp.asarray(fresh.step, jnp.asarray(fresh.step).dtype))
  runs = {n: Run(c, n) for n in (1, 2, 3, 4, 8)}   # each compiles once
  workdir = os.path.join(os.path.dirname(os.path.abspath(out)), "resume")
  losses, finals = {}, {}
  for prefix, broken in (("", False), ("broken:", True)):
    for n, run in runs.items():
      key = f"{prefix}{n}"
      losses[key] = []
      finals[key] = _flat(run.train(run.place(fresh), batches, losses[key], broken))
    shutil.rmtree(workdir, ignore_errors=True)
    for before, after in RESUMES:
      key = f"{prefix}{before}->{after}"
      first, second = runs[before], runs[after]
      losses[key] = []
      state = first.train(first.place(fresh), batches[:STEPS // 2], losses[key], broken)
      ckpt = Checkpointer(os.path.join(workdir, f"{before}-{after}"))
      ckpt.save(STEPS // 2, state, {}, c)
      ckpt.wait()
      step, state, _ = ckpt.restore_latest(second.place(fresh))
      ckpt.close()
      assert step == STEPS // 2
      finals[key] = _flat(second.train(state, batches[STEPS // 2:], losses[key], broken))
  np.savez(out, **finals)
  print(json.dumps(losses))


if __name__ == "__main__":
  main(sys.argv[1])
