"""Speed of volume inference and lesion detection (the eval.py / predict.py pipeline).

  python bench/eval_speed.py [--repeats 3]

Prints Markdown tables:
1. Volume inference on the real CT (shared/data/real_ct, 122 x 101 x 30) and on a
   256 x 256 x 48 synthetic volume, for the demo model (widths 16..128) and the Table I
   model (64..1024), untrained weights: the earlier `segment_volume` (host-side float32
   windowing, one batch at a time) against `VolumeSegmenter` (int16 to the device,
   windowing there, next batch dispatched before the last is fetched), measured side by
   side in one process after a warm-up call each (compilation excluded), alternating.
   Seconds per volume, the fastest of `--repeats`, and the share of voxels labelled alike (the two window
   the HU on different processors, so float rounding can flip near-tied argmaxes of
   the untrained network). The Table I model runs only on the real CT (minutes per
   256 x 256 volume on two CPU cores).
2. `lesion_detection` on a LiTS-sized 512 x 512 x 200 volume with 20 tumours.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from munet_jax.runtime import configure_jax  # noqa: E402

configure_jax()

import munet_jax  # noqa: E402
from munet_jax import inference  # noqa: E402
from munet_jax.config import base_config  # noqa: E402
from munet_jax.data import nifti  # noqa: E402
from munet_jax.lesions import lesion_detection  # noqa: E402
from munet_jax.models import from_config  # noqa: E402
from munet_jax.preprocessing import preprocess  # noqa: E402
from munet_jax import sharding  # noqa: E402

REAL_CT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "data", "real_ct", "ct_abdomen_3mm.nii.gz")


def earlier_segment_volume(predict, mesh, variables, config, hu, batch):
  """The repository's segment_volume before this change, for comparison."""
  x, y, z = hu.shape
  out = np.empty((x, y, z), np.uint8)
  rows = sharding.batch_sharding(mesh)
  for start in range(0, z, batch):
    stop = min(start + batch, z)
    slices = np.moveaxis(hu[:, :, start:stop], -1, 0)
    images = np.zeros((batch, x, y, 1), np.float32)
    images[:stop - start, ..., 0] = preprocess(slices.astype(np.float32), config)
    labels = predict(variables, jax.device_put(images, rows))
    out[:, :, start:stop] = np.moveaxis(np.asarray(labels)[:stop - start], 0, -1)
  return out


def earlier_predict_fn(config, mesh):
  model = from_config(config)

  def predict(variables, images):
    return jnp.argmax(model.apply(variables, images, train=False), axis=-1).astype(jnp.uint8)

  return jax.jit(predict, out_shardings=sharding.batch_sharding(mesh))


def timed(fn, repeats):
  fn()  # warm-up: compilation
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def timed_pair(a, b, repeats):
  """Fastest of `repeats` runs of each, a and b alternating, after a warm-up of each.

  Alternating and taking the fastest keeps load from other processes (the machine is
  shared) from favouring whichever ran in a quiet moment.
  """
  a(), b()
  ta, tb = [], []
  for _ in range(repeats):
    for fn, times in ((a, ta), (b, tb)):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  return min(ta), min(tb)


def inference_table(repeats):
  real = nifti.read_image(REAL_CT)
  volumes = {"real CT 122x101x30": nifti.to_ras(real.data, real.affine),
             "synthetic 256x256x48": np.random.default_rng(0).integers(
                 -1000, 1000, (256, 256, 48)).astype(np.int16)}
  print("| model | volume | earlier s/volume | VolumeSegmenter s/volume | ratio | slices/s "
        "| same labels % |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, features in (("demo 16..128", (16, 32, 64, 128)),
                         ("Table I 64..1024", (64, 128, 256, 512, 1024))):
    c = base_config()
    c.model.features = features
    c.eval.batch_size = 16
    variables = munet_jax.init(jax.random.key(0), c)
    mesh = sharding.make_mesh(jax.local_devices())
    old = earlier_predict_fn(c, mesh)
    segmenter = inference.VolumeSegmenter(variables, c)
    placed = segmenter.variables
    for vname, hu in volumes.items():
      if len(features) > 4 and hu.shape[0] > 200:
        continue  # the Table I model on 256x256 slices takes minutes per volume on 2 cores
      t_old, t_new = timed_pair(lambda: earlier_segment_volume(old, mesh, placed, c, hu, 16),
                                lambda: segmenter(hu), repeats)
      same = np.mean(earlier_segment_volume(old, mesh, placed, c, hu, 16) == segmenter(hu))
      print(f"| {name} | {vname} | {t_old:.3f} | {t_new:.3f} | {t_old / t_new:.2f} | "
            f"{hu.shape[2] / t_new:.1f} | {100 * same:.3f} |", flush=True)


def ball(shape, centre, radius):
  grids = np.ogrid[tuple(slice(0, n) for n in shape)]
  return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def lesion_table(repeats):
  rng = np.random.default_rng(0)
  shape = (512, 512, 200)
  ref = np.zeros(shape, bool)
  pred = np.zeros(shape, bool)
  for _ in range(20):
    centre = rng.integers(40, 472, 3)
    centre[2] = rng.integers(20, 180)
    radius = float(rng.uniform(2, 30))
    ref |= ball(shape, centre, radius)
    pred |= ball(shape, centre + rng.integers(-3, 4, 3), radius * rng.uniform(0.7, 1.2))
  spacing = (0.7, 0.7, 2.5)
  t = timed(lambda: lesion_detection(pred, ref, spacing), repeats)
  out = lesion_detection(pred, ref, spacing)
  print()
  print("| volume | reference lesions | predicted lesions | lesion_detection s |")
  print("| --- | --- | --- | --- |")
  print(f"| 512x512x200, 0.7x0.7x2.5 mm | {out['all']['ref_count']} | "
        f"{out['all']['pred_count']} | {t:.3f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  inference_table(args.repeats)
  lesion_table(args.repeats)


if __name__ == "__main__":
  main()
