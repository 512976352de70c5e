"""Throughput of the training data pipeline at 512x512: slices per second in ready batches.

  PYTHONPATH=. python bench/data_pipeline.py [--workers 2] [--batch 15] [--batches 300]

Makes synthetic 512x512 CT volumes (LiTS layout) in --data if not there, prepares their
slice store, then times `pipeline.make_train_iterator` delivering batches to this process,
for int16 HU images (what the pipeline ships) and for float32 images preprocessed in the
workers, side by side in one run (the machine is shared: compare the ratio), and int16
with no worker processes for reference. The first --warmup batches (worker start-up) are
not timed. Delivered batches are arrays this process owns (copied out of the workers'
shared-memory slots). 'trainer-process CPU' is the CPU time of this (the training)
process per batch, all its threads: what the pipeline takes from the training step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from munet_jax.config import base_config  # noqa: E402
from munet_jax.data import discovery, pipeline, store, synthetic  # noqa: E402


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def time_pipeline(slice_store, config, batch: int, batches: int, warmup: int,
                  preprocessed: bool) -> float:
  it = pipeline.make_train_iterator(slice_store, config, global_batch=batch,
                                    padded_batch=batch, process_index=0, process_count=1,
                                    preprocessed=preprocessed)
  try:
    for _ in range(warmup):
      next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  finally:
    it.close()
  return batches * batch / elapsed, cpu / batches * 1e3


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="/tmp/munet_bench_512", help="data root (made if absent)")
  parser.add_argument("--cases", type=int, default=4)
  parser.add_argument("--slices", type=int, default=100, help="slices per volume")
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--prefetch", type=int, default=4)
  parser.add_argument("--batch", type=int, default=15)
  parser.add_argument("--batches", type=int, default=300, help="timed batches per variant")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants")
  parser.add_argument("--sampling", default="all")
  parser.add_argument("--augment", action="store_true")
  args = parser.parse_args(argv)

  if not os.path.isdir(args.data) or not any(f.startswith("volume-") for f in os.listdir(args.data)):
    print(f"writing {args.cases} synthetic {args.size}x{args.size}x{args.slices} volumes "
          f"to {args.data}", flush=True)
    synthetic.write_dataset(args.data, args.cases, args.size, seed=0, slices=args.slices,
                            progress=False)
  cases = discovery.find_cases(args.data)
  slice_store = store.prepare_store(cases, store.default_cache_dir(args.data))
  config = base_config()
  config.data.image_size = args.size
  config.data.num_workers = args.workers
  config.data.prefetch = args.prefetch
  config.data.sampling = args.sampling
  config.data.augment.enabled = args.augment

  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"device: {os.cpu_count()}-core CPU container ({platform.processor() or platform.machine()})")
  print(f"command: PYTHONPATH=. python bench/data_pipeline.py {' '.join(sys.argv[1:])}")
  print(f"store: {len(slice_store)} volumes, {slice_store.num_slices} slices of "
        f"{args.size}x{args.size}; batch {args.batch}, workers {args.workers}, prefetch "
        f"{args.prefetch}, sampling {args.sampling}, augment {args.augment}")
  print(f"load before: {_load()}")
  variants = [(f"int16 HU, {args.workers} workers", False, args.workers),
              (f"float32 preprocessed, {args.workers} workers", True, args.workers),
              ("int16 HU, in-process (0 workers)", False, 0)]
  results = {name: [] for name, _, _ in variants}
  for _ in range(args.repeats):
    for name, preprocessed, workers in variants:
      config.data.num_workers = workers
      rate, cpu_ms = time_pipeline(slice_store, config, args.batch, args.batches, args.warmup,
                                   preprocessed)
      results[name].append((rate, cpu_ms))
      print(f"  {name:40s} {rate:8.1f} slices/s, trainer process CPU {cpu_ms:5.1f} ms/batch",
            flush=True)
  print(f"load after: {_load()}")
  print("| pipeline | slices/s, best | slices/s, all runs | trainer-process CPU ms/batch, median |")
  print("| --- | --- | --- | --- |")
  for name, runs in results.items():
    rates = [r for r, _ in runs]
    cpu = float(np.median([c for _, c in runs]))
    print(f"| {name} | {max(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} | {cpu:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
