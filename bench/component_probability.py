"""Can a probability threshold tell true tumour components from false ones?

  python bench/component_probability.py --workdir RUN --data ROOT [--split test | --cases volume-24 ...]

Segments the cases with the run (no post-processing but the largest liver component),
labels the predicted tumour components (6-connected) and, for thresholds on each
component's mean and largest tumour probability, and smallest sizes, prints how many true
(overlapping reference tumour) and false components are kept and the lesion recall left
(reference lesions overlapped by a kept component). An analysis for choosing
post-processing, not a step of it.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import munet_jax  # noqa: E402
from munet_jax import postprocessing as pp  # noqa: E402
from munet_jax.data.splits import cases_of_split  # noqa: E402
from munet_jax.data.volumes import load_case  # noqa: E402
from munet_jax.inference import VolumeSegmenter  # noqa: E402
from munet_jax.prediction import PROBABILITY_SCALE  # noqa: E402

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
SIZES = (0, 8, 32)


def components(segment, hu, ref, case):
  """Per predicted tumour component: size, mean and largest probability, the reference
  lesions it overlaps (as (case, lesion) pairs); and the number of reference lesions."""
  faces = ndimage.generate_binary_structure(3, 1)
  labels, probs = segment(hu, probabilities=True)
  labels = pp.apply(labels, {"largest_liver_component": True})
  tumour = probs[..., 2].astype(np.float32) / PROBABILITY_SCALE
  pred, _ = ndimage.label(labels == 2, structure=faces)
  lesions, n_ref = ndimage.label(ref == 2, structure=faces)
  rows = []
  for i, where in enumerate(ndimage.find_objects(pred), start=1):
    mask = pred[where] == i
    rows.append({"size": int(mask.sum()), "mean": float(tumour[where][mask].mean()),
                 "max": float(tumour[where][mask].max()),
                 "hits": {(case, int(v)) for v in np.unique(lesions[where][mask]) if v}})
  return rows, n_ref


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True, help="LiTS-layout folder holding the cases")
  p.add_argument("--split", default="test",
                  help="the run's split to analyse ('all' for every case under --data)")
  p.add_argument("--cases", nargs="+", help="volume-N names (instead of --split)")
  args = p.parse_args()
  config, variables = munet_jax.load(args.workdir)
  segmenter = VolumeSegmenter(variables, config, postprocessing={})
  cases = cases_of_split(config, "all" if args.cases else args.split, args.data)
  if args.cases:
    unknown = set(args.cases) - {c.name for c in cases}
    if unknown:
      p.error(f"no such case under {args.data}: {', '.join(sorted(unknown))}")
    cases = [c for c in cases if c.name in set(args.cases)]
  rows, total = [], 0
  for case in cases:
    volume = load_case(case)  # RAS arrays, as evaluation reads them
    case_rows, n_ref = components(segmenter.segment, volume.hu, volume.labels, case.name)
    rows += case_rows
    total += n_ref
  print(f"{len(cases)} volumes, {total} reference lesions, {len(rows)} predicted "
        "tumour components")
  for key in ("mean", "max"):
    for threshold in THRESHOLDS:
      for size in SIZES:
        kept = [r for r in rows if r[key] >= threshold and r["size"] >= size]
        true = sum(bool(r["hits"]) for r in kept)
        found = len(set().union(*(r["hits"] for r in kept))) if kept else 0
        print(f"{key} probability >= {threshold:.2f}, size >= {size:2d}: true {true:4d}, "
              f"false {len(kept) - true:4d}, precision {true / max(1, len(kept)):.3f}, "
              f"lesion recall {found / max(1, total):.3f}")


if __name__ == "__main__":
  main()
