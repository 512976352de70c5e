"""Lesion sizes of a data root: how many, and how big, per the detection's size classes.

  python bench/lesion_sizes.py ROOT [ROOT ...]

For every case (LiTS or Decathlon layout), each 3-D tumour component (face connectivity,
as `munet_jax.lesions`) is measured by its largest axial cross-section: the area (mm²)
and the diameter of the circle of that area. Prints the count of lesions, the share below
10 mm and below the small-lesion bound (28 x 28 mm², `eval.small_lesion_mm`), and
quantiles of the diameter, per root.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def diameters(root: str) -> tuple[np.ndarray, int]:
  """Equivalent diameters (mm) of the largest axial cross-section of every lesion; cases."""
  from munet_jax.data import nifti
  from munet_jax.data.discovery import find_cases
  from munet_jax.lesions import lesion_detection
  out, cases = [], find_cases(root)
  for case in cases:
    image = nifti.read_image(case.image)
    label = nifti.read_label(case.label, like=image)
    ref = nifti.to_ras(label.data, image.affine) == 2
    found = lesion_detection(ref, ref, nifti.ras_spacing(image.affine))
    out += [2.0 * np.sqrt(r["max_area_mm2"] / np.pi) for r in found["reference"]]
  return np.array(out), len(cases)


def main(argv) -> int:
  if not argv:
    print(__doc__)
    return 2
  bound = 2.0 * np.sqrt(28.0 * 28.0 / np.pi)
  for root in argv:
    d, n = diameters(root)
    if not d.size:
      print(f"{root}: {n} cases, no lesions")
      continue
    q = np.percentile(d, [10, 25, 50, 75, 90])
    print(f"{root}: {n} cases, {d.size} lesions ({int((d < bound).sum())} small, "
          f"{int((d >= bound).sum())} large); diameter of the largest axial cross-section, "
          f"mm: min {d.min():.1f}, quantiles 10/25/50/75/90 % "
          + " / ".join(f"{v:.1f}" for v in q) + f", max {d.max():.1f}; "
          f"{100 * np.mean(d < 10):.0f} % below 10 mm, {100 * np.mean(d < 20):.0f} % below 20 mm")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
