"""Training throughput (slices/s), FLOPs and peak memory of the jitted training step.

  python bench/train_speed.py                                  # Table I model, 512x512, batch 15
  python bench/train_speed.py --features 16,32,64,128 --size 128 --steps 10   # a CPU-sized run

Times `make_train_step` on a fixed synthetic batch (int16 HU, as the data pipeline
delivers it), data-parallel over every local device, float32 and bfloat16 compute
(`--dtypes`). FLOPs per training slice come from XLA's cost analysis of the compiled
step; model FLOPs utilisation is reported when the device's peak is known.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from munet_jax.config import base_config  # noqa: E402
from munet_jax.runtime import configure_jax  # noqa: E402
from munet_jax import sharding  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402

# Dense peak TFLOP/s per device by (device kind prefix, dtype), from the vendors' data sheets.
PEAK_TFLOPS = {
    ("NVIDIA H100", "bfloat16"): 989.0, ("NVIDIA H100", "float32"): 494.0,   # TF32 tensor cores
    ("NVIDIA H200", "bfloat16"): 989.0, ("NVIDIA H200", "float32"): 494.0,
}


def peak_tflops(device, dtype):
  for (kind, dt), value in PEAK_TFLOPS.items():
    if device.device_kind.startswith(kind) and dt == dtype:
      return value
  return None


def measure(features, size, batch, dtype, steps, warmup, cost_only=False):
  c = base_config()
  c.model.features = features
  c.model.dtype = dtype
  c.train.batch_size = batch
  mesh = sharding.make_mesh(jax.local_devices())
  padded = sharding.padded_batch_size(batch, mesh.devices.size)
  state = jax.device_put(create_train_state(c, jax.random.key(0)), sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  local = dict(image=rng.integers(-1000, 1000, (padded, size, size, 1)).astype(np.int16),
               label=rng.integers(0, 3, (padded, size, size)).astype(np.int32),
               mask=np.arange(padded) < batch)
  data = sharding.global_batch_from_local(local, mesh)
  step = jax.jit(make_train_step(c), donate_argnums=0,
                 out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  compiled = step.lower(state, data).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The cost is that of one device's share (padded / devices rows) of the step.
  flops_per_slice = float(cost.get("flops", float("nan"))) * mesh.devices.size / padded
  if cost_only:
    return dict(flops=flops_per_slice)
  for _ in range(warmup):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics["loss"])
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics["loss"])
  seconds = time.perf_counter() - t0
  rate = steps * batch / seconds
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host: the process
  tflops = peak_tflops(device, dtype)
  mfu = (rate * flops_per_slice / 1e12) / (tflops * mesh.devices.size) if tflops else None
  return dict(rate=rate, step_s=seconds / steps, flops=flops_per_slice, peak=peak, mfu=mfu,
              loss=float(metrics["loss"]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", default="64,128,256,512,1024")
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=15)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--cost-only", action="store_true", help="compile and print FLOPs, no timing")
  args = p.parse_args()
  configure_jax()
  features = tuple(int(f) for f in args.features.split(","))
  devices = jax.local_devices()
  print(f"# {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"widths {features}, {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps")
  print("| compute dtype | slices/s | s/step | TFLOP per training slice | peak memory GiB | MFU |")
  print("| --- | --- | --- | --- | --- | --- |")
  for dtype in args.dtypes.split(","):
    r = measure(features, args.size, args.batch, dtype, args.steps, args.warmup, args.cost_only)
    if args.cost_only:
      print(f"| {dtype} | - | - | {r['flops'] / 1e12:.4f} | - | - |", flush=True)
      continue
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
    print(f"| {dtype} | {r['rate']:.2f} | {r['step_s']:.3f} | {r['flops'] / 1e12:.4f} | "
          f"{r['peak'] / 2**30:.2f} | {mfu} |", flush=True)


if __name__ == "__main__":
  main()
