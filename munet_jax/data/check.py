"""Validates every case of a data root: `python -m munet_jax.data.check ROOT`.

Finds the cases (either layout), reads each image and label with full validation and
prints one summary line. The first bad case stops it with exit status 2 and one stderr
line naming the file and the problem (`--debug` shows the traceback).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tqdm

from munet_jax.data import discovery, nifti
from munet_jax.errors import UserError
from munet_jax.labels import tumour_mask


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a data root holds. Spacings in mm, (min, max) over cases."""
  cases: int
  labelled: int
  with_tumour: int
  voxels: int
  in_plane_mm: tuple[float, float]
  slice_mm: tuple[float, float]

  def line(self, root: str) -> str:
    return (f"{root}: {self.cases} cases OK ({self.labelled} labelled, "
            f"{self.with_tumour} with tumour), {self.voxels / 1e6:.1f} M voxels, "
            f"in-plane {self.in_plane_mm[0]:.2f}-{self.in_plane_mm[1]:.2f} mm, "
            f"slices {self.slice_mm[0]:.2f}-{self.slice_mm[1]:.2f} mm")


def check_cases(cases: Sequence[discovery.Case], progress: bool = False) -> Summary:
  """Reads every image and label with validation; raises `UserError` on the first bad one."""
  if not cases:
    raise UserError("no cases to check")
  in_plane, thick = [], []
  labelled = tumour = voxels = 0
  for case in tqdm.tqdm(cases, desc="checking", unit="case", disable=not progress):
    image = nifti.read_image(case.image)
    voxels += image.data.size
    spacing = nifti.ras_spacing(image.affine)  # slice axis last whatever the file order
    in_plane += spacing[:2]
    thick.append(spacing[2])
    if case.label is not None:
      label = nifti.read_label(case.label, like=image)
      labelled += 1
      tumour += bool(np.any(tumour_mask(label.data)))
  return Summary(cases=len(cases), labelled=labelled, with_tumour=tumour, voxels=voxels,
                 in_plane_mm=(min(in_plane), max(in_plane)), slice_mm=(min(thick), max(thick)))


def check_root(root, require_labels: bool = True, progress: bool = False) -> Summary:
  """Finds and validates every case under `root` (see `discovery.find_cases`)."""
  return check_cases(discovery.find_cases(root, require_labels=require_labels), progress)


if __name__ == "__main__":   # the `munet-check` tool (munet_jax.cli.check); the library never imports it
  import runpy
  runpy.run_module("munet_jax.cli.check", run_name="__main__")
