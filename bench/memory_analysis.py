"""Per-device memory of the compiled training step, from XLA's memory analysis (no run).

  python bench/memory_analysis.py                       # Table I, 512x512, batch 15; 1, 2, 8 devices
  python bench/memory_analysis.py --devices 1 --dtypes bfloat16 --remat

Compiles `make_train_step` for a data-parallel mesh of N forced host (CPU) devices and
prints XLA's buffer assignment per device: arguments (parameters, optimiser state,
batch), outputs, temporaries (activations kept for the backward pass and scratch) and
their sum less the donated (aliased) bytes. The CPU backend's buffer assignment stands
in for a GPU's: the same program and liveness, but a GPU compiler fuses and schedules
differently and cuDNN adds its workspace, so treat the figures as an estimate.
"""

import argparse
import os
import sys

# Host devices must be forced before JAX starts.
_MAX_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={_MAX_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from munet_jax.config import base_config  # noqa: E402
from munet_jax.runtime import configure_jax  # noqa: E402
from munet_jax import sharding  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402

GIB = 2 ** 30


def analyse(features, size, batch, dtype, devices, remat):
  c = base_config()
  c.model.features = features
  c.model.dtype = dtype
  c.model.remat = remat
  c.train.batch_size = batch
  mesh = sharding.make_mesh(jax.devices()[:devices])
  padded = sharding.padded_batch_size(batch, devices)
  state = jax.eval_shape(lambda: create_train_state(c, jax.random.key(0)))
  rep = sharding.replicated(mesh)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
  shard = sharding.batch_sharding(mesh)
  data = dict(image=jax.ShapeDtypeStruct((padded, size, size, 1), np.int16, sharding=shard),
              label=jax.ShapeDtypeStruct((padded, size, size), np.int32, sharding=shard),
              mask=jax.ShapeDtypeStruct((padded,), np.bool_, sharding=shard))
  step = jax.jit(make_train_step(c), donate_argnums=0, out_shardings=(rep, rep))
  return step.lower(state, data).compile().memory_analysis()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", default="64,128,256,512,1024")
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=15)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--devices", default="1,2,8")
  p.add_argument("--remat", action="store_true", help="model.remat=True")
  args = p.parse_args()
  configure_jax()
  features = tuple(int(f) for f in args.features.split(","))
  print(f"# jax {jax.__version__}, XLA CPU buffer assignment; widths {features}, "
        f"{args.size}x{args.size}, global batch {args.batch}, model.remat={args.remat}")
  print("| compute dtype | devices | rows per device | arguments GiB | outputs GiB | "
        "temporaries GiB | aliased GiB | total per device GiB |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for dtype in args.dtypes.split(","):
    for n in (int(d) for d in args.devices.split(",")):
      m = analyse(features, args.size, args.batch, dtype, n, args.remat)
      total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
      rows = sharding.padded_batch_size(args.batch, n) // n
      print(f"| {dtype} | {n} | {rows} | {m.argument_size_in_bytes / GIB:.2f} | "
            f"{m.output_size_in_bytes / GIB:.2f} | {m.temp_size_in_bytes / GIB:.2f} | "
            f"{m.alias_size_in_bytes / GIB:.2f} | {total / GIB:.2f} |", flush=True)


if __name__ == "__main__":
  main()
