"""`segmentation_metrics` against other exact surface-distance tools, side by side.

Ours is `segmentation_metrics` with its default method ("host"); `--jax` adds a row for
method "jax" (the jitted JAX program). Every contender computes the same thing: the face-connected surfaces of both objects
(an erosion, the array's edge counting as background), the exact Euclidean distance of
each surface voxel of one to the nearest surface voxel of the other with the voxel
spacing, both directions pooled, then ASSD, MSSD (the Hausdorff distance), HD95 and the
normalised surface Dice at a tolerance. The peers work on the joint bounding box of the
two masks (as ours does) with 2 threads where they have threads:

  SimpleITK   SignedMaurerDistanceMap of the other surface (exact, linear time)
  edt         edt.edt of the other surface's complement (exact, linear time)
  MONAI       get_mask_edges + get_surface_distance (scipy's EDT underneath); its own
              hd95 is the larger of the two directed 95th percentiles, shown as
              "hd95 (directed max)", the pooled one beside it
  medpy       0.5.2's own surface distances (full volume; about a minute a case at
              512 x 512 x 200), as the reference values: run once per case, on request

Each contender runs in its own process on the same arrays (a file the parent writes):
the process loads them, makes one untimed call (ours compiles then) and times
`--repeats` calls. Rounds alternate the contenders (ours, SimpleITK, edt, MONAI, ours,
...), so a ratio to ours is taken within a round and the median over rounds is quoted.

  python bench/metrics_peers.py                           # 512 x 512 x 200, every case
  python bench/metrics_peers.py --medpy                   # and medpy's values, once each
  python bench/metrics_peers.py --jax                     # and ours with method="jax"
  python bench/metrics_peers.py --shape 128 128 50 --cases fair,island   # smoke run
  python bench/metrics_peers.py --sweep                   # ours alone: box size, distance

The peers are the `bench` extra (pip install -e ".[bench]"); a missing one is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metrics_speed import maxrss_mib, reset_peak, rss_mib, smooth_field  # noqa: E402

PEERS = ("simpleitk", "edt", "monai")
VALUES = ("assd", "mssd", "hd95", "nsd")
THREADS = 2


# ----------------------------------------------------------------------------- cases


def organ(shape, seed, scale=1.0, bump=0.025, bump_grid=(48, 48, 24)):
  """(ref, pred): a perturbed ellipsoid and a copy with its boundary moved a little.

  `scale` multiplies a liver's radii (2.5: most of the volume); `bump` is how far the
  prediction's boundary moves (relative to the radii), `bump_grid` how finely it varies.
  """
  rng = np.random.default_rng(seed)
  x, y, z = shape
  centre = (0.40 * x, 0.42 * y, 0.5 * z) if scale <= 1 else (0.5 * x, 0.5 * y, 0.5 * z)
  radii = (0.17 * scale * x, 0.14 * scale * y, 0.22 * scale * z)
  lobes = smooth_field(rng, shape, (8, 8, 6))
  detail = smooth_field(rng, shape, tuple(min(g, n) for g, n in zip(bump_grid, shape)))
  ref, pred = np.empty(shape, bool), np.empty(shape, bool)
  gx = ((np.arange(x, dtype=np.float32) - centre[0]) / radii[0])[:, None] ** 2
  gy = ((np.arange(y, dtype=np.float32) - centre[1]) / radii[1])[None, :] ** 2
  for k in range(z):                                    # slab by slab: little memory
    r = np.sqrt(gx + gy + ((k - centre[2]) / radii[2]) ** 2)
    level = 1.0 + 0.25 * lobes[..., k]
    ref[..., k] = r < level
    pred[..., k] = r < level + bump * detail[..., k]
  return ref, pred


def add_island(pred, ref, distance_mm, spacing, side_mm=6.0):
  """A cube of `side_mm` in pred, about `distance_mm` beyond ref's extent along axis 1
  (clipped to the array)."""
  stop = int(np.flatnonzero(ref.any(axis=(0, 2)))[-1])
  centre = [int(np.flatnonzero(ref.any(axis=(1, 2))).mean()),
            min(pred.shape[1] - 1, stop + int(round(distance_mm / spacing[1]))),
            int(np.flatnonzero(ref.any(axis=(0, 1))).mean())]
  half = [max(1, int(round(side_mm / 2 / s))) for s in spacing]
  pred[tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(centre, half))] = True


def make_case(name, shape, spacing, seed=0):
  if name == "fair":            # a smooth boundary error of a few voxels
    return organ(shape, seed)
  if name == "island":          # the same plus one false positive ~100 mm away
    ref, pred = organ(shape, seed)
    add_island(pred, ref, 100.0, spacing)
    return ref, pred
  if name == "bumpy":           # a bumpy boundary error plus the island
    ref, pred = organ(shape, seed, bump=0.05, bump_grid=(160, 160, 64))
    add_island(pred, ref, 100.0, spacing)
    return ref, pred
  if name == "poor":            # large errors and 300 small false positives all over
    ref, pred = organ(shape, seed, bump=0.15, bump_grid=(24, 24, 12))
    rng = np.random.default_rng(seed + 1)
    for _ in range(300):
      corner = [int(rng.integers(n - 4)) for n in shape]
      side = [int(rng.integers(1, 5)) for _ in shape]
      pred[tuple(slice(c, c + s) for c, s in zip(corner, side))] = True
    return ref, pred
  if name == "large":           # an organ filling most of the volume
    return organ(shape, seed, scale=2.5)
  raise ValueError(f"unknown case {name}")


CASES = ("fair", "island", "bumpy", "poor", "large")


# ---------------------------------------------------------------------------- workers


def _box(ref, pred):
  either = ref | pred
  return tuple(slice(int(h[0]), int(h[-1]) + 1) for h in
               (np.flatnonzero(either.any(axis=tuple(j for j in range(3) if j != i)))
                for i in range(3)))


def _surfaces(ref, pred):
  from munet_jax.metrics import surface       # a plain numpy erosion, shared by all
  box = _box(ref, pred)
  return surface(ref[box]), surface(pred[box])


def _summary(d_pred, d_ref, tolerance):
  """Pooled statistics of the two directed distance arrays (float64)."""
  d = np.concatenate([d_pred, d_ref])
  return dict(assd=float(d.mean()), mssd=float(d.max()), hd95=float(np.percentile(d, 95)),
              nsd=float(np.count_nonzero(d <= tolerance) / d.size),
              hd95_directed_max=float(max(np.percentile(d_pred, 95),
                                          np.percentile(d_ref, 95))))


def compute_ours(ref, pred, spacing, tolerance, method="host"):
  from munet_jax.metrics import segmentation_metrics
  v = segmentation_metrics(pred, ref, spacing, nsd_tolerance=tolerance, method=method)
  return {k: v[k] for k in VALUES}


def compute_ours_jax(ref, pred, spacing, tolerance):
  return compute_ours(ref, pred, spacing, tolerance, method="jax")


def compute_simpleitk(ref, pred, spacing, tolerance):
  import SimpleITK as sitk
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
  s_ref, s_pred = _surfaces(ref, pred)

  def distance_to(mask):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))   # sitk is x-fastest
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(distance)

  # Maurer's map is negative inside the object; surface voxels of the other at distance 0
  # are inside it, so clamp.
  d_pred = np.maximum(distance_to(s_ref)[s_pred], 0.0)
  d_ref = np.maximum(distance_to(s_pred)[s_ref], 0.0)
  return _summary(d_pred, d_ref, tolerance)


def compute_edt(ref, pred, spacing, tolerance):
  import edt
  s_ref, s_pred = _surfaces(ref, pred)

  def distance_to(mask):
    return edt.edt(~mask, anisotropy=tuple(spacing), black_border=False, parallel=THREADS)

  return _summary(distance_to(s_ref)[s_pred], distance_to(s_pred)[s_ref], tolerance)


def compute_monai(ref, pred, spacing, tolerance):
  import torch
  from monai.metrics.utils import get_mask_edges, get_surface_distance
  torch.set_num_threads(THREADS)
  box = _box(ref, pred)
  edges_pred, edges_ref = get_mask_edges(pred[box], ref[box], crop=True)
  d_pred = get_surface_distance(edges_pred, edges_ref, distance_metric="euclidean",
                                spacing=spacing)
  d_ref = get_surface_distance(edges_ref, edges_pred, distance_metric="euclidean",
                               spacing=spacing)
  return _summary(np.asarray(d_pred, np.float64), np.asarray(d_ref, np.float64), tolerance)


def compute_medpy(ref, pred, spacing, tolerance):
  from medpy.metric import binary
  distances = getattr(binary, "__surface_distances")   # what its assd, hd, hd95 use
  return _summary(distances(pred, ref, spacing, 1), distances(ref, pred, spacing, 1),
                  tolerance)


COMPUTE = {"ours": compute_ours, "ours-jax": compute_ours_jax, "simpleitk": compute_simpleitk,
           "edt": compute_edt, "monai": compute_monai, "medpy": compute_medpy}


def worker(who, data, spacing, tolerance, repeats):
  ref, pred = np.load(os.path.join(data, "ref.npy")), np.load(os.path.join(data, "pred.npy"))
  compute = COMPUTE[who]
  loaded = rss_mib()
  reset_peak()
  start = time.perf_counter()
  values = compute(ref, pred, spacing, tolerance)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    values = compute(ref, pred, spacing, tolerance)
    times.append(time.perf_counter() - start)
  return dict(who=who, first_s=first, times_s=times, rss_loaded_mib=loaded,
              rss_peak_mib=maxrss_mib(), values=values)


def run_worker(who, data, args, repeats=None):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(THREADS))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", who, "--data", data,
         "--spacing", *map(str, args.spacing), "--tolerance", str(args.tolerance),
         "--repeats", str(args.repeats if repeats is None else repeats)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    lines = proc.stderr.strip().splitlines()
    return None, (lines or ["failed"])[-1]
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


def available(who):
  module = {"simpleitk": "SimpleITK", "edt": "edt", "monai": "monai", "medpy": "medpy"}[who]
  proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
  return proc.returncode == 0


def _uptime():
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------- main


def compare(args):
  peers = [p for p in PEERS if available(p)]
  missing = [p for p in PEERS if p not in peers]
  if missing:
    print(f"not installed, skipped: {', '.join(missing)}")
  spacing = tuple(args.spacing)
  for name in args.cases.split(","):
    ref, pred = make_case(name, tuple(args.shape), spacing, args.seed)
    box = _box(ref, pred)
    extent = tuple(b.stop - b.start for b in box)
    print(f"\n== {name}: volume {tuple(args.shape)}, spacing {spacing}, box {extent} "
          f"({math.prod(extent) / 1e6:.1f} M voxels), ref {int(ref.sum()):,}, "
          f"pred {int(pred.sum()):,} voxels | {_uptime()}")
    with tempfile.TemporaryDirectory() as data:
      np.save(os.path.join(data, "ref.npy"), ref)
      np.save(os.path.join(data, "pred.npy"), pred)
      del ref, pred
      runs = {who: [] for who in ("ours", *(("ours-jax",) if args.jax else ()), *peers)}
      for _ in range(args.rounds):
        for who in runs:
          result, error = run_worker(who, data, args)
          if result is None:
            sys.exit(f"{who} failed on {name}: {error}")
          runs[who].append(result)
      medpy = None
      if args.medpy:
        medpy, error = run_worker("medpy", data, args, repeats=0)
        if medpy is None:
          sys.exit(f"medpy failed on {name}: {error}")
    print(f"{'':10s} {'median s':>9s} {'min s':>7s} {'vs ours':>10s} "
          f"{'peak MiB':>9s}  " + "  ".join(f"{k:>12s}" for k in VALUES)
          + f"  {'hd95 (directed max)':>20s}")
    for who, results in runs.items():
      times = [min(r["times_s"]) for r in results]     # per round: its best call
      # This contender's time over ours in the same round (> 1: ours is faster).
      ratio = np.median([t / min(o["times_s"]) for o, t in zip(runs["ours"], times)])
      v = results[-1]["values"]
      directed = v.get("hd95_directed_max")
      print(f"{who:10s} {np.median(times):9.3f} {min(times):7.3f} {ratio:10.3f} "
            f"{max(r['rss_peak_mib'] for r in results):9.0f}  "
            + "  ".join(f"{v[k]:12.7f}" for k in VALUES)
            + (f"  {directed:20.7f}" if directed is not None else ""))
    if medpy is not None:
      v = medpy["values"]
      print(f"{'medpy':10s} {medpy['first_s']:9.3f} {'(once)':>7s} {'':10s} "
            f"{medpy['rss_peak_mib']:9.0f}  " + "  ".join(f"{v[k]:12.7f}" for k in VALUES)
            + f"  {v['hd95_directed_max']:20.7f}")
      ours = runs["ours"][-1]["values"]
      worst = max(abs(ours[k] - v[k]) / max(abs(v[k]), 1e-300) for k in VALUES)
      print(f"ours vs medpy: largest relative difference {worst:.1e}")
  print(f"\nat the end: {_uptime()}")


def _ours_alone(ref, pred, args):
  """(box voxels in millions, median seconds, peak MiB) of ours on one case."""
  box = _box(ref, pred)
  voxels = math.prod(b.stop - b.start for b in box) / 1e6
  with tempfile.TemporaryDirectory() as data:
    np.save(os.path.join(data, "ref.npy"), ref)
    np.save(os.path.join(data, "pred.npy"), pred)
    result, error = run_worker("ours", data, args)
  if result is None:
    sys.exit(f"ours failed: {error}")
  return voxels, float(np.median(result["times_s"])), result["rss_peak_mib"]


def sweep(args):
  """Ours alone: time and peak memory over box sizes, and over an island's distance."""
  spacing = tuple(args.spacing)
  print(f"box size (the fair case in growing volumes) | {_uptime()}")
  print(f"{'volume':>16s} {'box M voxels':>13s} {'median s':>9s} {'s per M voxels':>15s} "
        f"{'peak MiB':>9s}")
  for scale in (0.5, 0.7, 1.0, 1.4):
    shape = tuple(int(round(n * scale)) for n in args.shape)
    voxels, t, peak = _ours_alone(*make_case("fair", shape, spacing, args.seed), args)
    print(f"{str(shape):>16s} {voxels:13.1f} {t:9.3f} {t / voxels:15.4f} {peak:9.0f}")
  print(f"\nisland distance (the fair case plus one island) | {_uptime()}")
  print(f"{'distance mm':>12s} {'box M voxels':>13s} {'median s':>9s} {'peak MiB':>9s}")
  for distance in (0.0, 12.5, 25.0, 50.0, 100.0, 150.0):
    ref, pred = make_case("fair", tuple(args.shape), spacing, args.seed)
    if distance:
      add_island(pred, ref, distance, spacing)
    voxels, t, peak = _ours_alone(ref, pred, args)
    label = f"{distance:g}" if distance else "no island"
    print(f"{label:>12s} {voxels:13.1f} {t:9.3f} {peak:9.0f}")
  print(f"\nat the end: {_uptime()}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
  parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
  parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance, mm")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=1, help="timed calls per process")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--medpy", action="store_true", help="medpy's values, once a case")
  parser.add_argument("--jax", action="store_true",
                      help="also ours with method='jax' (the jitted program) as a contender")
  parser.add_argument("--sweep", action="store_true", help="ours over sizes and distances")
  parser.add_argument("--worker", choices=tuple(COMPUTE), help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.data, tuple(args.spacing), args.tolerance,
                            args.repeats)))
    return
  print(time.strftime("%Y-%m-%d %H:%M:%S %Z"), "|", f"{os.cpu_count()} CPUs |", _uptime())
  (sweep if args.sweep else compare)(args)


if __name__ == "__main__":
  main()
