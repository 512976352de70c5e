"""Speed and peak memory of `segmentation_metrics` against medpy 0.5.2, side by side.

One liver-sized irregular blob (the reference) and a slightly different prediction (its
boundary moved by a few voxels, irregularly, plus a small false-positive island) in a
CT-sized volume. Each contender runs in its own subprocess on the same arrays, so peak
memory is its own: we report the resident memory once the inputs are loaded and the
peak while computing the metrics (VmHWM, reset after loading; for ours it includes the
first call's compilation). Ours is timed after a first call that compiles, and once
more after medpy's run (the machine is shared, so the two bracket it); medpy computes
the paper's five metrics (dc, 1 - jc, ravd, assd, hd with connectivity 1 and the voxel
spacing). With a GPU present ours also runs there.

  python bench/metrics_speed.py                         # 512 x 512 x 200, as reported
  python bench/metrics_speed.py --shape 128 128 48      # smoke run
  python bench/metrics_speed.py --no-medpy --shape 512 512 1000   # memory of a big one
  python bench/metrics_speed.py --organ-scale 2.5       # an object filling most of it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("dsc", "voe", "rvd", "assd", "mssd")


def smooth_field(rng, shape, coarse, dtype=np.float32):
  """Low-frequency noise of `shape`: a coarse random grid, smoothed and upsampled."""
  from scipy import ndimage
  grid = ndimage.gaussian_filter(rng.standard_normal(coarse), 1.0, mode="wrap")
  grid /= grid.std()
  zoom = [s / c for s, c in zip(shape, coarse)]
  return ndimage.zoom(grid.astype(dtype), zoom, order=1, mode="nearest", grid_mode=True)


def make_case(shape, seed=0, scale=1.0):
  """(ref, pred) boolean volumes: a perturbed ellipsoid and a slightly different copy.

  `scale` multiplies the ellipsoid's radii (1: liver-sized; 2.5: most of the volume)."""
  rng = np.random.default_rng(seed)
  x, y, z = shape
  centre = (0.40 * x, 0.42 * y, 0.5 * z) if scale <= 1 else (0.5 * x, 0.5 * y, 0.5 * z)
  radii = (0.17 * scale * x, 0.14 * scale * y, 0.22 * scale * z)
  shape_field = smooth_field(rng, shape, (8, 8, 6))     # the organ's lobes
  detail = smooth_field(rng, shape, (48, 48, 24))       # the prediction's errors
  ref = np.empty(shape, bool)
  pred = np.empty(shape, bool)
  gx = ((np.arange(x, dtype=np.float32) - centre[0]) / radii[0])[:, None] ** 2
  gy = ((np.arange(y, dtype=np.float32) - centre[1]) / radii[1])[None, :] ** 2
  for k in range(z):                                    # slab by slab: little memory
    r = np.sqrt(gx + gy + ((k - centre[2]) / radii[2]) ** 2)
    level = 1.0 + 0.25 * shape_field[..., k]
    ref[..., k] = r < level
    pred[..., k] = r < level + 0.025 * detail[..., k]
  # A false-positive island about 2 cm beyond the organ's edge.
  cx, cy, cz = int(min(centre[0] + 1.25 * radii[0], 0.9 * x)), int(centre[1]), int(centre[2])
  rad = max(2, x // 128)
  pred[cx - rad:cx + rad + 1, cy - rad:cy + rad + 1, cz - rad:cz + rad + 1] = True
  return ref, pred


def _status_mib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def rss_mib() -> float:
  """Resident memory now (Linux), else the peak so far."""
  now = _status_mib("VmRSS")
  return now if now is not None else maxrss_mib()


def reset_peak() -> None:
  """Starts peak tracking afresh (Linux >= 4.0); otherwise the peak includes the loading."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def maxrss_mib() -> float:
  """Peak resident memory of this process: VmHWM (reset by `reset_peak`), else maxrss.

  getrusage's maxrss would also count the parent's peak before exec on Linux.
  """
  peak = _status_mib("VmHWM")
  if peak is not None:
    return peak
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_ours(data, spacing, repeats):
  ref, pred = np.load(os.path.join(data, "ref.npy")), np.load(os.path.join(data, "pred.npy"))
  import jax
  from munet_jax.metrics import segmentation_metrics
  loaded = rss_mib()
  reset_peak()
  start = time.perf_counter()
  values = segmentation_metrics(pred, ref, spacing)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    values = segmentation_metrics(pred, ref, spacing)
    times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return dict(who="ours", device=f"{device.platform}: {device.device_kind}", first_s=first,
              times_s=times, rss_loaded_mib=loaded, rss_peak_mib=maxrss_mib(),
              device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20 or None,
              values=values)


def worker_medpy(data, spacing, repeats):
  ref, pred = np.load(os.path.join(data, "ref.npy")), np.load(os.path.join(data, "pred.npy"))
  from medpy.metric import binary
  loaded = rss_mib()
  reset_peak()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    values = dict(dsc=binary.dc(pred, ref), voe=1.0 - binary.jc(pred, ref),
                  rvd=binary.ravd(pred, ref),
                  assd=binary.assd(pred, ref, voxelspacing=spacing, connectivity=1),
                  mssd=binary.hd(pred, ref, voxelspacing=spacing, connectivity=1))
    times.append(time.perf_counter() - start)
  return dict(who="medpy 0.5.2", device="cpu (numpy/scipy)", times_s=times,
              rss_loaded_mib=loaded, rss_peak_mib=maxrss_mib(),
              values={k: float(v) for k, v in values.items()})


def run_worker(kind, data, args, platform=None):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if platform:
    env["JAX_PLATFORMS"] = platform
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--data", data,
         "--spacing", *map(str, args.spacing), "--repeats",
         str(args.repeats if kind == "ours" else args.medpy_repeats)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "Error" in line]
    return None, (errors or lines or ["failed"])[-1:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
  parser.add_argument("--spacing", type=float, nargs=3, default=[0.75, 0.75, 2.5])
  parser.add_argument("--repeats", type=int, default=5, help="timed calls of ours")
  parser.add_argument("--medpy-repeats", type=int, default=1)
  parser.add_argument("--no-medpy", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--organ-scale", type=float, default=1.0,
                      help="radii of the object relative to a liver's (bigger: slower)")
  parser.add_argument("--worker", choices=("ours", "medpy"), help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  spacing = tuple(args.spacing)

  if args.worker:
    fn = worker_ours if args.worker == "ours" else worker_medpy
    print(json.dumps(fn(args.data, spacing, args.repeats)))
    return

  print(time.strftime("%Y-%m-%d %H:%M:%S %Z"), "|", os.uname().nodename, "|",
        f"{os.cpu_count()} CPUs |", subprocess.run(["uptime"], capture_output=True,
                                                    text=True).stdout.strip())
  start = time.perf_counter()
  ref, pred = make_case(tuple(args.shape), args.seed, args.organ_scale)
  box = [np.flatnonzero(np.any(ref | pred, axis=tuple(j for j in range(3) if j != i)))
         for i in range(3)]
  print(f"volume {tuple(args.shape)}, spacing {spacing} | ref {int(ref.sum()):,} voxels, "
        f"pred {int(pred.sum()):,} voxels, bounding box "
        f"{tuple(int(b[-1] - b[0] + 1) for b in box)} (made in {time.perf_counter() - start:.1f} s)")
  with tempfile.TemporaryDirectory() as data:
    np.save(os.path.join(data, "ref.npy"), ref)
    np.save(os.path.join(data, "pred.npy"), pred)
    del ref, pred
    results = []
    for kind, platform in (("ours", "cpu"), ("ours", "cuda")):
      result, error = run_worker(kind, data, args, platform)
      if result:
        results.append(result)
      elif platform == "cpu":
        sys.exit(f"our CPU run failed: {error}")
      else:
        print(f"no GPU run (JAX_PLATFORMS=cuda: {error[0][:100]})")
    if not args.no_medpy:
      result, error = run_worker("medpy", data, args)
      if not result:
        sys.exit(f"medpy run failed: {error}")
      results.append(result)
      # Ours again after medpy: the machine is shared, so the two bracket medpy's run.
      result, _ = run_worker("ours", data, args, "cpu")
      if result:
        result["who"] = "ours, again"
        results.append(result)

  print(f"\n{'':12s} {'device':28s} {'first call':>10s} {'median':>9s} {'min':>9s} "
        f"{'RSS inputs':>11s} {'RSS peak':>9s} {'device peak':>11s}")
  for r in results:
    first = f"{r['first_s']:.2f} s" if "first_s" in r else "-"
    dev = f"{r['device_peak_mib']:.0f} MiB" if r.get("device_peak_mib") else "-"
    print(f"{r['who']:12s} {r['device'][:28]:28s} {first:>10s} {np.median(r['times_s']):>7.3f} s "
          f"{min(r['times_s']):>7.3f} s {r['rss_loaded_mib']:>7.0f} MiB {r['rss_peak_mib']:>5.0f} MiB "
          f"{dev:>11s}")
  print("\nvalues:")
  for r in results:
    print(f"  {r['who']:12s} " + "  ".join(f"{k} {r['values'][k]:.6f}" for k in NAMES))
  medpy = [r for r in results if r["who"].startswith("medpy")]
  if medpy:
    m = medpy[0]
    for r in results:
      if r is m:
        continue
      worst = max(abs(r["values"][k] - m["values"][k]) / abs(m["values"][k]) for k in NAMES)
      ratio = np.median(m["times_s"]) / np.median(r["times_s"])
      print(f"  {r['who']} ({r['device'][:28]}): {ratio:.1f}x faster than medpy (median "
            f"times), largest relative difference {worst:.1e}")
  print("\nat the end:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
  main()
