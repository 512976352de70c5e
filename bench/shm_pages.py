"""Why the pipeline reuses shared-memory slots: fresh pages cost more than the batch.

  PYTHONPATH=. python bench/shm_pages.py [--size 512] [--batch 15]

Times, for one batch of int16 images and int32 labels: filling a fresh shared-memory
block each time (what Grain does per element), filling the same block again (what
`munet_jax.data.batch_slots` does), and building the batch from the slice store's memory
maps into reused memory (`BatchBuilder.fill`, when --store is given).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multiprocessing import shared_memory  # noqa: E402


def _ms(fn, n: int) -> float:
  fn()
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n * 1e3


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=15)
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--store", default="/tmp/munet_bench_512/.munet_cache",
                      help="a prepared slice store (from bench/data_pipeline.py)")
  args = parser.parse_args(argv)
  nbytes = args.batch * args.size * args.size * (2 + 4)

  def fresh():
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    np.ndarray((nbytes,), np.uint8, buffer=shm.buf).fill(1)
    shm.close()
    shm.unlink()

  kept = shared_memory.SharedMemory(create=True, size=nbytes)
  view = np.ndarray((nbytes,), np.uint8, buffer=kept.buf)

  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"device: {os.cpu_count()}-core CPU container")
  print(f"command: PYTHONPATH=. python bench/shm_pages.py {' '.join(sys.argv[1:])}")
  print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"one batch: {args.batch} x {args.size}^2 int16 image + int32 label = "
        f"{nbytes / 2**20:.1f} MiB")
  print("| work per batch | ms |")
  print("| --- | --- |")
  print(f"| fill a fresh shared-memory block (create, touch, unlink) | {_ms(fresh, args.repeats):.1f} |")
  print(f"| fill a reused shared-memory block | {_ms(lambda: view.fill(2), args.repeats):.1f} |")
  del view
  kept.close()
  kept.unlink()
  if os.path.isdir(args.store):
    from munet_jax.config import base_config
    from munet_jax.data import pipeline, store
    st = store.open_store(args.store)
    config = base_config()
    config.data.image_size = args.size
    rng = np.random.default_rng(0)
    for preprocessed in (False, True):
      builder = pipeline.BatchBuilder(st, config, global_batch=args.batch, rows=args.batch,
                                      first_row=0, preprocessed=preprocessed)
      image, label = (np.empty(f.shape, f.dtype) for f in builder.fields)
      ms = _ms(lambda: builder.fill(0, rng.integers(0, st.num_slices, args.batch), image,
                                    label), args.repeats)
      kind = "float32 preprocessed" if preprocessed else "int16 HU"
      print(f"| build the batch from the store, {kind}, into reused memory | {ms:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
