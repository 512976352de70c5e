"""NIfTI volumes in and out: validated reading, grid-exact atomic writing, RAS reorientation.

Every problem with a file is a `UserError` whose message starts with the file's path, so
the command-line tools print one line that names it. Arrays stay in the file's voxel order;
`to_ras` / `from_ras` move between that order and RAS (axis 2 running inferior -> superior),
which is how the slice pipeline sees every volume whatever its orientation on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from munet_jax.atomic import atomic_output
from munet_jax.errors import UserError

LABEL_VALUES = (0, 1, 2)  # background, liver, tumour
AFFINE_TOLERANCE = 1e-4   # image/label affines from different writers differ by float32 rounding
_RAS = orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass(frozen=True)
class Volume:
  """One 3-D volume as read from disk.

  Attributes:
    data: (X, Y, Z) array in file (voxel) order. Images keep their stored dtype (int16 HU
      for most CT; float32 when the header scales values to non-integers); labels are uint8.
    affine: (4, 4) float64 voxel -> world (RAS+, mm) matrix from the header.
    path: the file it came from.
    header: the nibabel header, kept so labels can be written back on exactly this grid
      (qform and sform with their codes); None for volumes made in memory.
  """
  data: np.ndarray
  affine: np.ndarray
  path: str
  header: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def spacing(self) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (file order).

    The lengths of the affine's columns: the header zooms for any consistent header, and
    the true geometry when a writer left pixdim and sform out of step.
    """
    return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _fail(path, problem: str):
  raise UserError(f"{os.fspath(path)}: {problem}")


def _load(path) -> tuple[nib.Nifti1Image, np.ndarray]:
  """Opens a NIfTI file and reads its array as a 3-D volume; every failure is a UserError."""
  path = os.fspath(path)
  if not os.path.exists(path):
    _fail(path, "file not found")
  if os.path.isdir(path):
    _fail(path, "is a folder, expected a NIfTI file")
  if not os.access(path, os.R_OK):
    _fail(path, "permission denied (file is not readable)")
  try:
    with _nibabel_messages() as messages:
      img = nib.load(path)
  except Exception as e:  # nibabel raises many types for garbage; all mean "not NIfTI"
    _fail(path, f"not a readable NIfTI file ({_reason(e)})")
  if any("should be non-zero" in m and "pixdim" in m for m in messages):
    # nibabel would quietly substitute 1 mm; distances in mm would then be made up.
    _fail(path, "header voxel size (pixdim) is zero, so the geometry is unknown")
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    _fail(path, f"not a NIfTI file (read as {type(img).__name__})")
  shape = img.shape
  if len(shape) < 3:
    _fail(path, f"is {len(shape)}-D with shape {tuple(shape)}, expected a 3-D volume")
  if len(shape) > 3 and any(n != 1 for n in shape[3:]):
    _fail(path, f"is {len(shape)}-D with shape {tuple(shape)}, expected a 3-D volume")
  if min(shape[:3]) == 0:
    _fail(path, f"is empty (shape {tuple(shape)})")
  affine = np.array(img.affine, dtype=np.float64)
  if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    _fail(path, "header has no valid voxel-to-world affine (zero or non-finite voxel size)")
  try:
    data = _read_array(img)
  except Exception as e:  # truncated or corrupt data section
    _fail(path, f"cannot read voxel data, file truncated or corrupt ({_reason(e)})")
  return img, data.reshape(shape[:3])  # drops trailing singleton dimensions


_NIBABEL_LOG_LOCK = threading.Lock()


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def _nibabel_messages():
  """Collects the header fixes nibabel logs while loading, instead of printing them.

  Tools promise one stderr line per error; nibabel would add its own lines.
  """
  logger = nib.imageglobals.logger
  handler = _Collect()
  with _NIBABEL_LOG_LOCK:
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
      yield handler.messages
    finally:
      logger.handlers, logger.propagate = saved


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) < 160 else text[:157] + "..."


def _read_array(img) -> np.ndarray:
  """The voxel values, scaled by scl_slope / scl_inter without inflating to float64."""
  proxy = img.dataobj
  raw = np.asarray(proxy.get_unscaled())
  if not raw.dtype.isnative:  # big-endian files: JAX and most numpy code want native order
    raw = raw.astype(raw.dtype.newbyteorder("="))
  slope, inter = float(proxy.slope), float(proxy.inter)
  if slope == 1.0 and inter == 0.0:
    return raw
  # Integer scaling of integer data stays integer: many CT writers store HU as
  # uint16 with intercept -1024.
  if (raw.dtype.kind in "iu" and slope.is_integer() and inter.is_integer()):
    lo, hi = (raw.min(), raw.max()) if raw.size else (0, 0)
    ends = sorted((lo * slope + inter, hi * slope + inter))
    if np.iinfo(np.int16).min <= ends[0] and ends[1] <= np.iinfo(np.int16).max:
      return (raw.astype(np.int32) * int(slope) + int(inter)).astype(np.int16)
  return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def read_image(path) -> Volume:
  """Reads a CT volume and checks it is a finite 3-D NIfTI image.

  Args:
    path: a `.nii` or `.nii.gz` file. A 4-D file whose trailing dimensions are all 1 is
      read as 3-D.

  Returns:
    Volume with `data` of shape (X, Y, Z) in the stored dtype (HU for CT).

  Raises:
    UserError naming the file: missing, unreadable, not NIfTI, not 3-D, truncated,
    or holding NaN / infinite values.
  """
  img, data = _load(path)
  if data.dtype.kind == "f":
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
      _fail(path, f"image holds {bad} NaN or infinite values")
  elif data.dtype.kind not in "iub":
    _fail(path, f"voxel type {data.dtype} is not supported (expected integer or real values)")
  return Volume(data=data, affine=np.array(img.affine, np.float64), path=os.fspath(path),
                header=img.header)


def read_label(path, like: Volume | None = None) -> Volume:
  """Reads a label volume (0 background, 1 liver, 2 tumour) as uint8.

  Args:
    path: a `.nii` or `.nii.gz` label file.
    like: the image this label belongs to; when given, the label must have its shape
      and, within `AFFINE_TOLERANCE` mm, its affine.

  Returns:
    Volume with uint8 `data` of shape (X, Y, Z).

  Raises:
    UserError naming the file: any reading problem of `read_image`, values other than
    0, 1, 2, or a grid that differs from `like`'s.
  """
  img, data = _load(path)
  path = os.fspath(path)
  if data.dtype.kind not in "iubf":
    _fail(path, f"voxel type {data.dtype} is not supported (expected integer or real values)")
  # min / max first: a full np.unique of a 512x512x900 volume costs seconds.
  lo, hi = (data.min(), data.max())
  integral = data.dtype.kind != "f" or bool(np.all(np.mod(data, 1) == 0))
  if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= 2 and integral):
    bad = data[~np.isin(data, LABEL_VALUES)]
    shown = ", ".join(f"{v:g}" for v in np.unique(bad)[:5])
    _fail(path, f"label values must be 0, 1 or 2 (background, liver, tumour); "
          f"found {shown} in {bad.size} voxels")
  data = data.astype(np.uint8, copy=False)
  affine = np.array(img.affine, np.float64)
  if like is not None:
    if data.shape != like.data.shape:
      _fail(path, f"label shape {data.shape} differs from image shape {like.data.shape} "
            f"of {like.path}")
    if not np.allclose(affine, like.affine, rtol=0, atol=AFFINE_TOLERANCE):
      worst = float(np.abs(affine - like.affine).max())
      _fail(path, f"label affine differs from the affine of image {like.path} "
            f"(largest difference {worst:.4g}); they are not on the same voxel grid")
  return Volume(data=data, affine=affine, path=path, header=img.header)


def _check_labels(path, labels: np.ndarray, like: Volume) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != like.data.shape:
    raise ValueError(f"labels of shape {labels.shape} for {path} do not match the image "
                     f"shape {like.data.shape} of {like.path}")
  if labels.size and (labels.min() < 0 or labels.max() > 2):
    raise ValueError(f"labels for {path} must be 0, 1 or 2")
  return labels.astype(np.uint8, copy=False)


def write_label(path, labels: np.ndarray, like: Volume) -> None:
  """Writes uint8 labels on exactly `like`'s grid, atomically.

  Args:
    path: output `.nii` or `.nii.gz` file; its folder is created if missing.
    labels: (X, Y, Z) integer array of 0 / 1 / 2 in `like`'s voxel order.
    like: the image the labels belong to. Its header's qform and sform (matrices and
      codes) and units are copied unchanged, so viewers overlay the two exactly.

  The file is written under a temporary name in the same folder and renamed into place:
  an interrupted write never leaves a half-written file at `path`.
  """
  labels = _check_labels(path, labels, like)
  if like.header is not None and isinstance(like.header, nib.Nifti1Header):
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 2
    header["intent_code"] = 0
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # The header's affine fields are kept as they are: nibabel only rewrites them when
    # the given affine is not close to them, and `like.affine` came from this header.
    img = cls(labels, like.affine, header=header)
  else:
    img = _fresh_image(labels, like.affine)
  _save_atomic(img, path)


def write_image(path, data: np.ndarray, affine: np.ndarray) -> None:
  """Writes a 3-D volume (e.g. int16 HU) with `affine` as qform and sform, atomically.

  Args:
    path: output `.nii` or `.nii.gz` file; its folder is created if missing.
    data: (X, Y, Z) array, written in its own dtype.
    affine: (4, 4) voxel -> world (RAS+, mm) matrix.
  """
  _save_atomic(_fresh_image(np.asarray(data), np.asarray(affine, np.float64)), path)


def _fresh_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  img = nib.Nifti1Image(data, affine)
  # Scanner coordinates in both forms: what ITK, 3D Slicer and nnU-Net read.
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm", "sec")
  return img


def _save_atomic(img, path) -> None:
  path = os.fspath(path)
  name = os.path.basename(path)
  ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None
  if ext is None:
    _fail(path, "output name must end in .nii or .nii.gz")
  with atomic_output(path, ext) as tmp:   # nibabel picks gzip from the extension
    nib.save(img, tmp)


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Reorients a voxel array to RAS: axes 0, 1, 2 run towards Right, Anterior, Superior.

  Only axis permutations and flips (the closest to the affine's direction cosines), no
  resampling. Axes beyond the third (e.g. channels) are carried along.

  Args:
    data: (X, Y, Z, ...) array in file order.
    affine: (4, 4) voxel -> world matrix of `data`.

  Returns:
    The reoriented array (often a view of `data`).
  """
  return orientations.apply_orientation(data, orientations.io_orientation(affine))


def from_ras(data_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Exact inverse of `to_ras` for the same `affine`: RAS order back to file order."""
  back = orientations.ornt_transform(_RAS, orientations.io_orientation(affine))
  return orientations.apply_orientation(data_ras, back)


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm along the axes of `to_ras(data, affine)`."""
  spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
  axes = orientations.io_orientation(affine)[:, 0].astype(int)  # file axis i -> RAS axis
  out = np.empty(3)
  out[axes] = spacing
  return tuple(float(s) for s in out)
