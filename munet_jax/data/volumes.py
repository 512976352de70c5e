"""A case as the library works on it: RAS arrays, (X, Y, Z), with spacing in the same order.

This is the one axis convention inside munet-jax. Axis 0 runs towards Right, 1 towards
Anterior, 2 towards Superior (an axial slice is `volume[:, :, z]`), whatever order the
file was written in; `spacing` is the voxel size in mm along those three axes. Files are
read in their own order and reoriented by permutation and flips only (`nifti.to_ras`),
never resampled; predictions go back to the file's order with `nifti.from_ras`. Code that
needs slices first (the slice store on disk, the model's batches) moves axes at its own
edge and back.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from munet_jax.data import nifti
from munet_jax.data.discovery import Case


@dataclasses.dataclass(frozen=True)
class CaseVolume:
  """One case, RAS-oriented.

  Attributes:
    name: the case name ('volume-3').
    hu: (X, Y, Z) Hounsfield units (the file's dtype, or int16 from the slice store).
    labels: (X, Y, Z) uint8 labels (0 background, 1 liver, 2 tumour), or None.
    spacing: (sx, sy, sz) voxel size in mm.
  """
  name: str
  hu: np.ndarray
  labels: np.ndarray | None
  spacing: tuple[float, float, float]


def load_case(case: Case) -> CaseVolume:
  """Reads a case's CT and label (if any) with validation (`nifti.read_image` / `read_label`).

  Raises:
    UserError naming the file, for any problem of either file or of their grids.
  """
  image = nifti.read_image(case.image)
  labels = None
  if case.label is not None:
    labels = nifti.to_ras(nifti.read_label(case.label, like=image).data, image.affine)
  return CaseVolume(case.name, nifti.to_ras(image.data, image.affine), labels,
                    nifti.ras_spacing(image.affine))


def prefetch(loaders: Iterable[Callable], ahead: int = 1) -> Iterator:
  """Calls each loader in a background thread, `ahead` of the consumer; yields results.

  Reading and decompressing the next NIfTI file overlaps with segmenting this one. An
  exception from a loader is raised where its result is consumed.
  """
  loaders = list(loaders)
  with ThreadPoolExecutor(max_workers=1) as pool:
    futures = [pool.submit(f) for f in loaders[:ahead]]
    for i in range(len(loaders)):
      if i + ahead < len(loaders):
        futures.append(pool.submit(loaders[i + ahead]))
      try:
        yield futures[i].result()
      except BaseException:
        for f in futures[i + 1:]:
          f.cancel()
        raise
      futures[i] = None  # free the volume
