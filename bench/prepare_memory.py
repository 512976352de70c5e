"""Peak memory of preparing one 512x512x900 CT volume into the slice store.

  PYTHONPATH=. python bench/prepare_memory.py [--data /tmp/munet_bench_900] [--slices 900]

Writes one CT-like volume with its label as int16 .nii.gz, int16 .nii (LiTS ships .nii)
and float32 .nii.gz (what some converters write; it is read as float32, twice the bytes),
then prepares each in a fresh child process that reports its peak resident memory
(`ru_maxrss`) after the imports and after `store.prepare_store`. The budget is 3 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_volume(root: str, ext: str, size: int, slices: int, dtype=np.int16) -> None:
  from munet_jax.data import nifti
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  x = np.linspace(-1, 1, size, dtype=np.float32)
  body = (x[:, None] / 0.9) ** 2 + (x[None, :] / 0.7) ** 2 < 1
  liver = ((x[:, None] + 0.3) / 0.35) ** 2 + ((x[None, :] - 0.1) / 0.3) ** 2 < 1
  hu = np.empty((size, size, slices), dtype)
  labels = np.zeros((size, size, slices), np.uint8)
  for z in range(slices):   # slice by slice: the writer's memory is not what is measured
    noise = rng.normal(0, 15, (size, size)).astype(np.float32)
    hu[:, :, z] = np.rint(np.where(body, 40 + noise, -1000 + noise / 5))
    if slices // 3 <= z < 2 * slices // 3:
      hu[:, :, z][liver] = 60
      labels[:, :, z][liver] = 1
      labels[size // 2 - 10:size // 2 + 10, size // 2 - 10:size // 2 + 10, z] = 2
  affine = np.diag([0.7, 0.7, 1.0, 1.0])
  nifti.write_image(os.path.join(root, f"volume-0{ext}"), hu, affine)
  nifti.write_image(os.path.join(root, f"segmentation-0{ext}"), labels, affine)


def _peak_kib() -> int:
  """This process's peak resident memory: VmHWM, which (unlike ru_maxrss, inherited from
  the parent across fork + exec) belongs to this process alone."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(root: str, cache: str) -> None:
  from munet_jax.data import discovery, store
  before = _peak_kib()
  start = time.perf_counter()
  s = store.prepare_store(discovery.find_cases(root), cache, progress=False)
  elapsed = time.perf_counter() - start
  peak = _peak_kib()
  print(json.dumps({"after_imports_kib": before, "peak_kib": peak, "seconds": elapsed,
                    "shape": list(s.volumes[0].shape)}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="/tmp/munet_bench_900")
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, default=900)
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(*args.child)
    return 0
  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"device: {os.cpu_count()}-core CPU container")
  print(f"command: PYTHONPATH=. python bench/prepare_memory.py {' '.join(sys.argv[1:])}")
  print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  volume_mib = args.size * args.size * args.slices * 2 / 2**20
  print(f"volume: {args.size}x{args.size}x{args.slices} int16 = {volume_mib:.0f} MiB")
  print("| file | file size | peak RSS after imports | peak RSS preparing | time |")
  print("| --- | --- | --- | --- | --- |")
  for ext, dtype in ((".nii.gz", np.int16), (".nii", np.int16), (".nii.gz", np.float32)):
    root = os.path.join(args.data, ext.strip(".").replace(".", "_") + f"_{np.dtype(dtype).name}")
    if not os.path.exists(os.path.join(root, f"volume-0{ext}")):
      _write_volume(root, ext, args.size, args.slices, dtype)   # before any child: _peak_kib
    cache = os.path.join(args.data, "cache" + ext.replace(".", "_"))
    shutil.rmtree(cache, ignore_errors=True)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, cache],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))})
    r = json.loads(run.stdout.strip().splitlines()[-1])
    size = os.path.getsize(os.path.join(root, f"volume-0{ext}")) / 2**20
    print(f"| {ext}, {np.dtype(dtype).name} | {size:.0f} MiB | {r['after_imports_kib'] / 2**20:.2f} GiB | "
          f"{r['peak_kib'] / 2**20:.2f} GiB | {r['seconds']:.1f} s |", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
