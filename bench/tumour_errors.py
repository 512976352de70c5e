"""Where a run's tumour Dice is lost: its error voxels, by lesion, and its large lesions.

  python bench/tumour_errors.py --workdir RUN --data ROOT [--split test] [--figure F.png]

Segments the split's cases with the run and its post-processing choice (as eval.py does)
and splits the tumour voxels it gets wrong into: false positives inside a predicted
component that touches a reference lesion and inside one that touches none; false
negatives inside a reference lesion that was found (hit by at least one voxel) and inside
one that was missed (components 6-connected). The pooled Dice these counts give is the
table's tumour global Dice. Then, for each reference lesion of at least `--large-voxels`
voxels: the fraction of it called tumour, its mean HU against that of the liver within
three voxels of it, and the mean tumour probability of its voxels called something
else. `--figure` draws the largest axial section of up to four such lesions: CT,
reference, tumour probability. An analysis for choosing the next recipe, not a step of
training or evaluation.
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

FACES = ndimage.generate_binary_structure(3, 1)
KINDS = ("tp", "fp_in_hit_component", "fp_in_false_component", "fn_in_found_lesion",
         "fn_in_missed_lesion")


def touched(labels: np.ndarray, n: int, other: np.ndarray) -> np.ndarray:
  """Per component 0..n of `labels`: does it share a voxel with `other` (0 is False)."""
  hit = np.zeros(n + 1, bool)
  hit[np.unique(labels[other])] = True
  hit[0] = False
  return hit


def case_errors(pred, ref, probs, hu, large_voxels):
  """The voxel counts of KINDS for one case, and one row per large reference lesion."""
  p, r = pred == 2, ref == 2
  pl, n_pred = ndimage.label(p, FACES)
  rl, n_ref = ndimage.label(r, FACES)
  hit_pred, found_ref = touched(pl, n_pred, r)[pl], touched(rl, n_ref, p)[rl]
  fp, fn = p & ~r, r & ~p
  counts = dict(zip(KINDS, (int((p & r).sum()), int((fp & hit_pred).sum()),
                            int((fp & ~hit_pred).sum()), int((fn & found_ref).sum()),
                            int((fn & ~found_ref).sum()))))
  rows = []
  sizes = np.bincount(rl.ravel(), minlength=n_ref + 1)
  for i in np.flatnonzero(sizes[1:] >= large_voxels) + 1:
    lesion = rl == i
    size = int(sizes[i])
    ring = ndimage.binary_dilation(lesion, FACES, iterations=3) & (ref == 1)
    missed = lesion & ~p
    rows.append({"lesion": int(i), "voxels": size, "found": float(p[lesion].mean()),
                 "lesion_hu": float(hu[lesion].mean()),
                 "ring_hu": float(hu[ring].mean()) if ring.any() else float("nan"),
                 "missed_probability": float(probs[..., 2][missed].mean() / PROBABILITY_SCALE)
                 if missed.any() else float("nan"),
                 "z": int(np.argmax(lesion.sum((0, 1))))})
  return counts, rows


def draw(path, panels):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3 * len(panels)), squeeze=False)
  for row, (title, hu, ref, prob) in zip(axes, panels):
    row[0].imshow(np.clip(hu.T, -100, 240), cmap="gray")
    row[0].set_title(title, fontsize=9)
    row[1].imshow(ref.T, vmin=0, vmax=2)
    row[1].set_title("reference (liver, tumour)", fontsize=9)
    row[2].imshow(prob.T, vmin=0, vmax=1)
    row[2].set_title("tumour probability", fontsize=9)
    for ax in row:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="data root (default: the run's data.root)")
  p.add_argument("--split", default="test")
  p.add_argument("--large-voxels", type=int, default=2000)
  p.add_argument("--figure", help="PNG of up to four large lesions")
  args = p.parse_args()
  config, variables = munet_jax.load(args.workdir)
  choice = pp.load_choice(args.workdir) or pp.from_config(config)
  segmenter = VolumeSegmenter(variables, config, postprocessing={})
  totals, panels = dict.fromkeys(KINDS, 0), []
  print(f"post-processing: {choice}")
  print(f"{'case':12s} {'lesion':>6s} {'voxels':>7s} {'found':>6s} {'HU':>6s} "
        f"{'ring HU':>7s} {'p(missed)':>9s}")
  for case in cases_of_split(config, args.split, args.data):
    volume = load_case(case)
    labels, probs = segmenter.segment(volume.hu, probabilities=True)
    labels = pp.apply(labels, choice)
    counts, rows = case_errors(labels, volume.labels, probs, volume.hu.astype(np.float32),
                               args.large_voxels)
    for k in KINDS:
      totals[k] += counts[k]
    for row in rows:
      print(f"{case.name:12s} {row['lesion']:6d} {row['voxels']:7d} {row['found']:6.2f} "
            f"{row['lesion_hu']:6.1f} {row['ring_hu']:7.1f} {row['missed_probability']:9.2f}")
      if len(panels) < 4:
        z = row["z"]
        panels.append((f"{case.name} lesion {row['lesion']}, z={z}, found "
                       f"{100 * row['found']:.0f} %", volume.hu[:, :, z],
                       volume.labels[:, :, z], probs[:, :, z, 2] / PROBABILITY_SCALE))
  errors = sum(totals.values()) - totals["tp"]
  print("tumour voxels: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
  print(f"tumour global Dice {2 * totals['tp'] / max(1, 2 * totals['tp'] + errors):.4f}")
  if args.figure and panels:
    draw(args.figure, panels)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
  main()
