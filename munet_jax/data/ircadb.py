"""3Dircadb-01 DICOM -> LiTS-layout NIfTI: `python -m munet_jax.data.ircadb SRC OUT`.

3Dircadb-01 has one folder per patient, `3Dircadb1.N/`, holding
  PATIENT_DICOM/            one CT slice per file (image_0, image_1, ...)
  MASKS_DICOM/<organ>/      the same slices as binary masks: liver, livertumor01, ...
either as folders or as the `PATIENT_DICOM.zip` / `MASKS_DICOM.zip` of the download.
For each patient this writes `OUT/volume-N.nii.gz` (int16 HU) and
`OUT/segmentation-N.nii.gz` (uint8: 0 background, 1 liver, 2 tumour).

Slices are ordered by ImagePositionPatient along the slice normal, never by file name.
The affine comes from ImagePositionPatient, ImageOrientationPatient and PixelSpacing,
turned from DICOM's LPS world into NIfTI's RAS by negating x and y. Voxel axis 0 runs
along a DICOM row (column index), axis 1 down the columns (row index), axis 2 along the
slice normal: a standard axial series comes out in LPS order, which the readers handle.

Labels: every `livertumor*` mask is tumour (2); the liver (1) is the `liver` mask joined
with the tumour masks, so each tumour lies inside the liver as in LiTS (liver = label > 0).
Other masks (vessels, cysts, other organs) are ignored.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import zipfile
from typing import Callable

import numpy as np
import pydicom

from munet_jax.data import nifti
from munet_jax.data.discovery import natural_key
from munet_jax.errors import UserError
from munet_jax.labels import liver_mask, tumour_mask

_PATIENT = re.compile(r"^3Dircadb1\.(\d+)$")
POSITION_TOLERANCE = 0.01   # mm; slices closer than this are one slice
SPACING_TOLERANCE = 0.02    # relative; slice gaps may differ by this much


@dataclasses.dataclass(frozen=True)
class _File:
  """One file of a series, in a folder or a zip: a name for messages and an opener."""
  name: str
  open: Callable[[], object]


@dataclasses.dataclass(frozen=True)
class _Slice:
  position: float     # mm along the slice normal
  origin: np.ndarray  # ImagePositionPatient, LPS mm
  pixels: np.ndarray  # (Rows, Columns) float32 after rescale
  name: str           # for messages
  key: str            # path inside PATIENT_DICOM or MASKS_DICOM/<organ>


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) < 160 else text[:157] + "..."


def _tree(patient: str, part: str) -> dict[str, _File]:
  """Files of `part` ('PATIENT_DICOM' or 'MASKS_DICOM') by path relative to it."""
  folder = os.path.join(patient, part)
  archive = folder + ".zip"
  files = {}
  if os.path.isdir(folder):
    for parent, dirs, names in os.walk(folder):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      for n in names:
        if not n.startswith("."):
          path = os.path.join(parent, n)
          files[os.path.relpath(path, folder).replace(os.sep, "/")] = _File(path, lambda p=path: p)
  elif os.path.isfile(archive):
    try:
      zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
      raise UserError(f"{archive}: not a readable zip file ({e})") from e
    for member in zf.namelist():
      parts = [p for p in member.split("/") if p]
      if member.endswith("/") or not parts or any(p.startswith(".") for p in parts):
        continue
      if parts[0] == part:  # the archive usually repeats the folder name
        parts = parts[1:]
      files["/".join(parts)] = _File(f"{archive}:{member}",
                                     lambda m=member: io.BytesIO(zf.read(m)))
  else:
    raise UserError(f"{patient}: no {part} folder (or {part}.zip); is this a 3Dircadb "
                    "patient folder?")
  if not files:
    raise UserError(f"{folder}: no DICOM files found")
  return files


def _read_slice(f: _File, rescale: bool = True):
  """Reads one DICOM slice; returns (dataset, (Rows, Columns) float32 pixels).

  With `rescale`, pixels are RescaleSlope * stored + RescaleIntercept (HU for CT). Masks
  are read without it: some carry the CT's intercept, which would turn 0 / 255 into
  -1024 / -769.
  """
  try:
    ds = pydicom.dcmread(f.open(), force=True)
    if "PixelData" not in ds:
      raise ValueError("no pixel data")
    pixels = ds.pixel_array.astype(np.float32)  # exact for 16-bit stored values
  except Exception as e:  # pydicom raises many types for broken files
    raise UserError(f"{f.name}: not a readable DICOM image ({_reason(e)})") from e
  if pixels.ndim != 2:
    raise UserError(f"{f.name}: expected one 2-D slice per file, got shape {pixels.shape}")
  if not rescale:
    return ds, pixels
  slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
  intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
  return ds, pixels * np.float32(slope) + np.float32(intercept)


def _read_series(files: dict[str, _File], what: str):
  """Reads a series and sorts it along the slice normal.

  Returns (slices, affine, normal): the affine in RAS (see module docstring), the unit
  slice normal in LPS.
  """
  slices, geometry = [], None
  for key in sorted(files, key=natural_key):
    f = files[key]
    ds, pixels = _read_slice(f)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
      if tag not in ds:
        raise UserError(f"{f.name}: DICOM tag {tag} is missing; cannot place the slice")
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    spacing = np.array([float(v) for v in ds.PixelSpacing])  # (between rows, between columns)
    this = (iop, spacing, pixels.shape, float(ds.get("SliceThickness", 1.0) or 1.0))
    if geometry is None:
      geometry = this
    elif (not np.allclose(iop, geometry[0], atol=1e-4) or
          not np.allclose(spacing, geometry[1], atol=1e-4) or pixels.shape != geometry[2]):
      raise UserError(f"{f.name}: slice geometry (orientation, pixel spacing or size) "
                      f"differs from the rest of the {what} series")
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    normal = np.cross(iop[:3], iop[3:])
    slices.append(_Slice(float(origin @ normal), origin, pixels, f.name, key))
  slices.sort(key=lambda s: s.position)
  positions = np.array([s.position for s in slices])
  gaps = np.diff(positions)
  for gap, s in zip(gaps, slices[1:]):
    if gap < POSITION_TOLERANCE:
      raise UserError(f"{s.name}: two slices of the {what} series at the same position "
                      f"({s.position:.3f} mm)")
  if gaps.size and np.ptp(gaps) > SPACING_TOLERANCE * np.median(gaps):
    raise UserError(f"{slices[0].name}: slices of the {what} series are not evenly spaced "
                    f"(gaps {gaps.min():.3f}-{gaps.max():.3f} mm); cannot write one affine")
  iop, spacing, _, thickness = geometry
  if len(slices) > 1:
    step = (slices[-1].origin - slices[0].origin) / (len(slices) - 1)  # follows any tilt
  else:
    step = np.cross(iop[:3], iop[3:]) * thickness
  affine = np.eye(4)
  affine[:3, 0] = iop[:3] * spacing[1]   # along a row: column index, axis 0
  affine[:3, 1] = iop[3:] * spacing[0]   # down a column: row index, axis 1
  affine[:3, 2] = step
  affine[:3, 3] = slices[0].origin
  return slices, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, np.cross(iop[:3], iop[3:])


def _stack(slices: list[_Slice]) -> np.ndarray:
  """(Rows, Columns) slices -> (Columns, Rows, Z) volume, matching the affine's axes."""
  return np.stack([s.pixels.T for s in slices], axis=-1)


def _mask(files: dict[str, _File], folder: str, image_slices: list[_Slice],
          normal: np.ndarray) -> np.ndarray:
  """One organ's mask as a (Columns, Rows, Z) bool volume on the CT's grid.

  Each mask file goes to the CT slice at its ImagePositionPatient (along the CT's slice
  normal); a mask file without that tag goes to the CT slice of the same file name.
  """
  positions = np.array([s.position for s in image_slices])
  index_of_key = {s.key: i for i, s in enumerate(image_slices)}
  volume = np.zeros((len(image_slices),) + image_slices[0].pixels.shape, bool)
  filled = np.zeros(len(image_slices), bool)
  for key in sorted(files, key=natural_key):
    f = files[key]
    ds, pixels = _read_slice(f, rescale=False)
    if "ImagePositionPatient" in ds:
      position = float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal)
      i = int(np.argmin(np.abs(positions - position)))
      if abs(positions[i] - position) > POSITION_TOLERANCE:
        raise UserError(f"{f.name}: mask slice at {position:.2f} mm matches no CT slice")
    elif key in index_of_key:
      i = index_of_key[key]
    else:
      raise UserError(f"{f.name}: mask slice has no ImagePositionPatient and no CT slice "
                      "of the same file name")
    if pixels.shape != volume.shape[1:]:
      raise UserError(f"{f.name}: mask slice is {pixels.shape}, the CT's are "
                      f"{volume.shape[1:]}")
    volume[i] = pixels > 0
    filled[i] = True
  if not filled.all():
    missing = image_slices[int(np.argmin(filled))].name
    raise UserError(f"{folder}: mask has {int(filled.sum())} of the CT's {filled.size} "
                    f"slices (none for {os.path.basename(missing)})")
  return volume.transpose(2, 1, 0)


def convert_patient(patient: str, out: str) -> dict:
  """Converts one `3Dircadb1.N` folder; returns a summary (paths, shape, spacing, volumes).

  Raises:
    UserError naming the folder or file: not a patient folder, unreadable or
    inconsistent DICOM, no liver mask, masks off the CT's slices.
  """
  patient = os.path.normpath(patient)
  match = _PATIENT.match(os.path.basename(patient))
  if not match:
    raise UserError(f"{patient}: not a 3Dircadb patient folder (expected a name like "
                    "3Dircadb1.7)")
  number = int(match.group(1))
  image_files = _tree(patient, "PATIENT_DICOM")
  mask_files = _tree(patient, "MASKS_DICOM")
  slices, affine, normal = _read_series(image_files, "CT")
  hu = _stack(slices)
  by_organ: dict[str, dict[str, _File]] = {}
  for key, f in mask_files.items():
    if "/" in key:
      organ, rest = key.split("/", 1)
      by_organ.setdefault(organ, {})[rest] = f
  liver_key = next((o for o in by_organ if o.lower() == "liver"), None)
  if liver_key is None:
    raise UserError(f"{os.path.join(patient, 'MASKS_DICOM')}: no 'liver' mask folder "
                    f"(found {', '.join(sorted(by_organ)) or 'none'})")
  masks = os.path.join(patient, "MASKS_DICOM")
  liver = _mask(by_organ[liver_key], os.path.join(masks, liver_key), slices, normal)
  tumour = np.zeros_like(liver)
  for organ in sorted(by_organ, key=natural_key):
    if organ.lower().startswith("livertumor"):
      tumour |= _mask(by_organ[organ], os.path.join(masks, organ), slices, normal)
  labels = np.zeros(hu.shape, np.uint8)
  labels[liver | tumour] = 1
  labels[tumour] = 2

  lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
  hu = np.clip(np.rint(hu), lo, hi).astype(np.int16)
  image_path = os.path.join(out, f"volume-{number}.nii.gz")
  label_path = os.path.join(out, f"segmentation-{number}.nii.gz")
  nifti.write_image(image_path, hu, affine)
  nifti.write_image(label_path, labels, affine)
  voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
  return {"patient": patient, "image": image_path, "label": label_path, "shape": hu.shape,
          "spacing": tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
          "liver_ml": float(liver_mask(labels).sum() * voxel_ml),
          "tumour_ml": float(tumour_mask(labels).sum() * voxel_ml)}


def find_patients(src: str) -> list[str]:
  """The `3Dircadb1.N` folders in `src` (or `src` itself if it is one), in number order."""
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise UserError(f"{src}: folder not found")
  if _PATIENT.match(os.path.basename(os.path.normpath(src))):
    return [src]
  found = [os.path.join(src, d) for d in os.listdir(src)
           if _PATIENT.match(d) and os.path.isdir(os.path.join(src, d))]
  if not found:
    raise UserError(f"{src}: no 3Dircadb patient folders (3Dircadb1.1, 3Dircadb1.2, ...)")
  return sorted(found, key=natural_key)


if __name__ == "__main__":   # the `munet-ircadb` tool (munet_jax.cli.ircadb); the library never imports it
  import runpy
  runpy.run_module("munet_jax.cli.ircadb", run_name="__main__")
