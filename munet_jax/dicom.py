"""DICOM CT series in: a folder of slice files becomes one volume per series.

A folder (searched recursively) may hold several series; files are grouped by
SeriesInstanceUID and each series is checked from its headers alone before any pixel is
read. Slices are sorted by their position along the slice normal (the cross product of
the two ImageOrientationPatient directions), ascending, and the voxel grid is the one
ITK's series reader (SimpleITK, what most tools convert with) gives:

  voxel (i, j, k) = column i, row j of the k-th slice in that order;
  world (LPS, mm) = IPP_0 + i * dc * row_dir + j * dr * col_dir + k * dz * normal,

with (dr, dc) = PixelSpacing and dz the slice spacing. The affine of `read_series` is that
map in NIfTI's RAS+ world (x and y negated), so `nifti.to_ras` / `from_ras` and a NIfTI
label file written with it land on exactly the grid a converted file has.

Only regular grids are accepted: every slice within `GRID_TOLERANCE` of a voxel of the
evenly spaced, untilted grid. A gantry tilt, missing slices, uneven spacing, slices of
different size or orientation, multi-frame files and other modalities than CT are
`UserError`s naming a file. Pixel values become Hounsfield units with each slice's
RescaleSlope / RescaleIntercept.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from munet_jax.data import nifti
from munet_jax.errors import UserError

# A slice may lie at most this fraction of a voxel off the regular grid (in-plane: of the
# smaller pixel spacing; along the normal: of the slice spacing).
GRID_TOLERANCE = 0.01
_DIRECTION_TOLERANCE = 1e-4   # between the ImageOrientationPatient of two slices
_DICOMDIR = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
             "Columns")


@dataclasses.dataclass(frozen=True)
class Series:
  """One CT series, checked, its files sorted along the slice normal.

  Attributes:
    uid: SeriesInstanceUID.
    files: the slice files, slice k of the volume first to last.
    sop_instance_uids: SOPInstanceUID of each file, in the same order.
    affine: (4, 4) voxel -> world (RAS+, mm) matrix of the (columns, rows, slices) array.
    shape: (columns, rows, slices).
    description: SeriesNumber and SeriesDescription, for messages.
  """
  uid: str
  files: tuple[str, ...]
  sop_instance_uids: tuple[str, ...]
  affine: np.ndarray
  shape: tuple[int, int, int]
  description: str = ""

  @property
  def folder(self) -> str:
    return os.path.dirname(self.files[0])


def _read_header(path: str):
  """The header of a DICOM file, or None for a file that is not DICOM (or a DICOMDIR)."""
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
          AttributeError):
    return None
  sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
  if str(sop_class or "") == _DICOMDIR:
    return None
  return ds


def dicom_files(folder: str) -> list[tuple[str, object]]:
  """(path, header) of every DICOM file under `folder`, in sorted path order."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      ds = _read_header(path)
      if ds is not None:
        out.append((path, ds))
  return out


def find_series(folder: str, quiet: bool = False) -> list[Series]:
  """Every CT series under `folder`, each checked from its headers; ordered by series UID.

  Localizer (scout) series (ImageType LOCALIZER) are left out with a note on stderr.

  Raises:
    UserError naming the folder (no DICOM files) or a file (see the module docstring).
  """
  headers = dicom_files(folder)
  if not headers:
    raise UserError(f"{folder}: no NIfTI files (*.nii, *.nii.gz) and no DICOM files in "
                    "the --input folder")
  groups: dict[str, list] = {}
  for path, ds in headers:
    uid = ds.get("SeriesInstanceUID")
    if not uid:
      raise UserError(f"{path}: DICOM file has no SeriesInstanceUID")
    groups.setdefault(str(uid), []).append((path, ds))
  series = []
  for uid in sorted(groups):
    files = groups[uid]
    if any("LOCALIZER" in _image_type(ds) for _, ds in files):
      if not quiet:
        print(f"note: {files[0][0]}: localizer series {uid} is left out", file=sys.stderr)
      continue
    series.append(_check_series(uid, files))
  if not series:
    raise UserError(f"{folder}: no CT series to segment (only localizer images)")
  return series


def _image_type(ds) -> list[str]:
  value = ds.get("ImageType", [])
  values = [value] if isinstance(value, (str, bytes)) else list(value)
  return [str(v).upper() for v in values]


def _floats(ds, key: str, path: str, n: int) -> np.ndarray:
  try:
    values = np.array([float(v) for v in ds[key].value], np.float64)
  except (TypeError, ValueError, KeyError):
    values = np.array([])
  if values.shape != (n,) or not np.isfinite(values).all():
    raise UserError(f"{path}: {key} must be {n} finite numbers, got {ds.get(key)!r}")
  return values


def _check_series(uid: str, files: list) -> Series:
  first_path, first = files[0]
  description = " ".join(str(x) for x in (first.get("SeriesNumber", ""),
                                           first.get("SeriesDescription", "")) if str(x))
  geometry = []
  for path, ds in files:
    modality = str(ds.get("Modality", "") or "missing")
    if modality != "CT":
      raise UserError(f"{path}: Modality is {modality}, expected CT")
    for key in _REQUIRED:
      if key not in ds or ds[key].value in (None, ""):
        raise UserError(f"{path}: DICOM CT slice has no {key}")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
      raise UserError(f"{path}: multi-frame (enhanced) DICOM is not supported; "
                      "export the series as one file per slice")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
      raise UserError(f"{path}: has {ds.SamplesPerPixel} samples per pixel, expected 1 (grey)")
    tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
    if abs(tilt) > 1e-3:
      raise UserError(f"{path}: gantry tilt of {tilt:g} degrees; tilted series are not "
                      "supported (resample it to an untilted grid first)")
    geometry.append((path, _floats(ds, "ImagePositionPatient", path, 3),
                     _floats(ds, "ImageOrientationPatient", path, 6),
                     _floats(ds, "PixelSpacing", path, 2), (int(ds.Rows), int(ds.Columns))))

  _, _, iop, pixel, size = geometry[0]
  for path, _, other_iop, other_pixel, other_size in geometry[1:]:
    if np.abs(other_iop - iop).max() > _DIRECTION_TOLERANCE:
      raise UserError(f"{path}: ImageOrientationPatient differs from {first_path} in the "
                      "same series")
    if other_size != size:
      raise UserError(f"{path}: slice size {other_size[0]}x{other_size[1]} differs from "
                      f"{size[0]}x{size[1]} of {first_path}")
    if np.abs(other_pixel - pixel).max() > 1e-4 * pixel.min():
      raise UserError(f"{path}: PixelSpacing {list(other_pixel)} differs from "
                      f"{list(pixel)} of {first_path}")
  if not (pixel > 0).all():
    raise UserError(f"{first_path}: PixelSpacing must be positive, got {list(pixel)}")
  row, col = iop[:3], iop[3:]
  if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 \
      or abs(row @ col) > 1e-3:
    raise UserError(f"{first_path}: ImageOrientationPatient is not two orthogonal unit "
                    f"vectors: {list(iop)}")
  row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
  normal = np.cross(row, col)

  if len(geometry) < 2:
    raise UserError(f"{first_path}: series {uid} has only one slice; a CT volume needs "
                    "at least two")
  order = sorted(range(len(geometry)), key=lambda k: float(geometry[k][1] @ normal))
  positions = np.array([geometry[k][1] for k in order])
  paths = [geometry[k][0] for k in order]
  depth = positions @ normal
  steps = np.diff(depth)
  same = int(np.argmin(steps))
  if steps[same] <= 1e-6:
    raise UserError(f"{paths[same + 1]}: two slices at the same position in series {uid} "
                    f"(also {paths[same]})")
  dz = float((depth[-1] - depth[0]) / (len(depth) - 1))
  # In-plane drift of the slice positions: a tilt that the header did not declare.
  drift = positions - positions[0] - np.outer(depth - depth[0], normal)
  worst = float(np.linalg.norm(drift, axis=1).max())
  if worst > GRID_TOLERANCE * pixel.min():
    angle = math.degrees(math.atan2(worst, float(depth[-1] - depth[0])))
    raise UserError(f"{paths[-1]}: slice positions shear by {worst:.3g} mm across series "
                    f"{uid} (a gantry tilt of {angle:.2g} degrees); tilted series are not "
                    "supported")
  off_grid = np.abs(depth - depth[0] - dz * np.arange(len(depth)))
  if off_grid.max() > GRID_TOLERANCE * dz:
    typical = float(np.median(steps))
    gap = int(np.argmax(steps))
    missing = round(steps[gap] / typical) - 1
    if missing >= 1 and abs(steps[gap] - (missing + 1) * typical) <= GRID_TOLERANCE * typical:
      raise UserError(f"{paths[gap + 1]}: {missing} slice(s) missing before this file in "
                      f"series {uid}: a gap of {steps[gap]:.4g} mm after {paths[gap]} where "
                      f"the slices are {typical:.4g} mm apart")
    raise UserError(f"{paths[gap + 1]}: uneven slice spacing in series {uid} (steps from "
                    f"{steps.min():.4g} to {steps.max():.4g} mm); only evenly spaced series "
                    "are supported")

  lps = np.eye(4)
  lps[:3, 0] = row * pixel[1]      # i: along a row, one column to the next
  lps[:3, 1] = col * pixel[0]      # j: down a column, one row to the next
  lps[:3, 2] = normal * dz
  lps[:3, 3] = positions[0]
  sops = tuple(str(files[k][1].get("SOPInstanceUID", "")) for k in order)
  return Series(uid=uid, files=tuple(paths), sop_instance_uids=sops,
                affine=_LPS_TO_RAS @ lps, shape=(size[1], size[0], len(paths)),
                description=description)


def read_series(series: Series) -> nifti.Volume:
  """The series' Hounsfield units as a `nifti.Volume` (no header) on its grid.

  Returns:
    Volume with `data` of shape (columns, rows, slices): int16 when every slice's rescale
    is integral and the values fit, float32 otherwise; `affine` as `Series.affine`;
    `path` the series' first file.
  """
  columns, rows, n = series.shape
  hu = None
  for k, path in enumerate(series.files):
    ds = None
    try:
      ds = pydicom.dcmread(path)
      pixels = ds.pixel_array
    except Exception as e:  # compressed without a decoder, truncated, ...
      syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
      name = f" (transfer syntax {syntax.name})" if syntax is not None else ""
      raise UserError(f"{path}: cannot read the pixel data{name}: "
                      f"{' '.join(str(e).split())[:160]}") from e
    if pixels.shape != (rows, columns):
      raise UserError(f"{path}: pixel data of shape {pixels.shape}, expected "
                      f"{rows}x{columns}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    exact = pixels.dtype.kind in "iu" and slope.is_integer() and inter.is_integer()
    if hu is None:
      hu = np.empty((columns, rows, n), np.int32 if exact else np.float32)
    elif not exact and hu.dtype != np.float32:
      hu = hu.astype(np.float32)   # a later slice with a fractional rescale
    if hu.dtype == np.int32:
      hu[:, :, k] = pixels.T.astype(np.int32) * int(slope) + int(inter)
    else:
      hu[:, :, k] = pixels.T.astype(np.float32) * np.float32(slope) + np.float32(inter)
  if hu.dtype == np.int32:
    small = np.iinfo(np.int16)
    hu = hu.astype(np.int16) if small.min <= hu.min() and hu.max() <= small.max \
        else hu.astype(np.float32)
  return nifti.Volume(data=hu, affine=series.affine.copy(), path=series.files[0])
