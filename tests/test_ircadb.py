"""munet_jax.data.ircadb: 3Dircadb DICOM series -> LiTS-layout NIfTI with the right geometry."""

import os
import shutil
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from munet_jax.data import ircadb, nifti
from munet_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, COLS, SLICES = 6, 8, 5               # rows != columns catches transposes
ROW_SPACING, COL_SPACING, GAP = 0.7, 0.8, 2.5
ORIGIN = np.array([-120.0, -95.5, 310.0])   # LPS mm of the first pixel of the lowest slice


def _write_slice(path, pixels, z_index, iop=(1, 0, 0, 0, 1, 0), position=True, intercept=-1024):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
  ds.ImageOrientationPatient = list(iop)
  normal = np.cross(iop[:3], iop[3:])
  if position:
    ds.ImagePositionPatient = list(ORIGIN + z_index * GAP * normal)
  ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
  ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def _make_patient(root, number=7, iop=(1, 0, 0, 0, 1, 0), mask_positions=True, zipped=False):
  """A 3Dircadb patient whose file names run opposite to the slice positions."""
  rng = np.random.default_rng(number)
  hu = rng.integers(-1000, 1500, size=(SLICES, ROWS, COLS))  # (z, row, column)
  liver = np.zeros_like(hu, bool)
  liver[1:4, 1:5, 2:7] = True
  tumour1 = np.zeros_like(liver)
  tumour1[2, 2, 3] = True
  tumour2 = np.zeros_like(liver)
  tumour2[3, 3:5, 5:7] = True     # partly outside the liver mask
  patient = os.path.join(root, f"3Dircadb1.{number}")
  order = rng.permutation(SLICES)  # file image_i holds slice order[i]
  folders = {"PATIENT_DICOM": hu + 1024, "MASKS_DICOM/liver": liver * 255,
             "MASKS_DICOM/livertumor01": tumour1 * 255, "MASKS_DICOM/livertumor02": tumour2 * 255,
             "MASKS_DICOM/liverkyst": np.ones_like(hu) * 255}
  for folder, volume in folders.items():
    os.makedirs(os.path.join(patient, folder))
    for i, z in enumerate(order):
      _write_slice(os.path.join(patient, folder, f"image_{i}"), volume[z], z, iop,
                   position=mask_positions or folder == "PATIENT_DICOM")
  if zipped:
    for part in ("PATIENT_DICOM", "MASKS_DICOM"):
      shutil.make_archive(os.path.join(patient, part), "zip", patient, part)
      shutil.rmtree(os.path.join(patient, part))
  return patient, hu, liver, tumour1 | tumour2


def _check_round_trip(out, number, hu, liver, tumour):
  image = nifti.read_image(os.path.join(out, f"volume-{number}.nii.gz"))
  labels = nifti.read_label(os.path.join(out, f"segmentation-{number}.nii.gz"), like=image)
  # NIfTI axes: 0 = DICOM column, 1 = DICOM row, 2 = slice position.
  np.testing.assert_array_equal(image.data, hu.transpose(2, 1, 0))
  want = np.where(tumour, 2, np.where(liver, 1, 0)).transpose(2, 1, 0)
  np.testing.assert_array_equal(labels.data, want)
  return image


def test_axial_series_geometry_hu_and_labels(tmp_path):
  _, hu, liver, tumour = _make_patient(tmp_path / "src")
  summary = ircadb.convert_patient(str(tmp_path / "src" / "3Dircadb1.7"), str(tmp_path / "out"))
  image = _check_round_trip(tmp_path / "out", 7, hu, liver, tumour)
  assert image.data.dtype == np.int16
  np.testing.assert_allclose(image.spacing, (COL_SPACING, ROW_SPACING, GAP))
  assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
  # Voxel (column 3, row 2, slice 4) lies at LPS ORIGIN + (3*0.8, 2*0.7, 4*2.5).
  lps = ORIGIN + (3 * COL_SPACING, 2 * ROW_SPACING, 4 * GAP)
  np.testing.assert_allclose(image.affine @ [3, 2, 4, 1], [-lps[0], -lps[1], lps[2], 1])
  assert summary["shape"] == (COLS, ROWS, SLICES)


def test_coronal_series_is_sorted_along_its_own_normal(tmp_path):
  iop = (1, 0, 0, 0, 0, -1)  # rows to the left, columns downwards: normal +y (posterior)
  _, hu, liver, tumour = _make_patient(tmp_path / "src", iop=iop)
  ircadb.convert_patient(str(tmp_path / "src" / "3Dircadb1.7"), str(tmp_path / "out"))
  image = _check_round_trip(tmp_path / "out", 7, hu, liver, tumour)
  assert nib.aff2axcodes(image.affine) == ("L", "I", "P")


def test_masks_without_positions_are_matched_by_file_name(tmp_path):
  _, hu, liver, tumour = _make_patient(tmp_path / "src", mask_positions=False)
  ircadb.convert_patient(str(tmp_path / "src" / "3Dircadb1.7"), str(tmp_path / "out"))
  _check_round_trip(tmp_path / "out", 7, hu, liver, tumour)


def test_zipped_download_layout(tmp_path):
  _, hu, liver, tumour = _make_patient(tmp_path / "src", zipped=True)
  assert zipfile.is_zipfile(tmp_path / "src" / "3Dircadb1.7" / "PATIENT_DICOM.zip")
  ircadb.convert_patient(str(tmp_path / "src" / "3Dircadb1.7"), str(tmp_path / "out"))
  _check_round_trip(tmp_path / "out", 7, hu, liver, tumour)


def test_command_line_converts_every_patient(tmp_path):
  _make_patient(tmp_path / "src", number=2)
  _make_patient(tmp_path / "src", number=10)
  run = subprocess.run([sys.executable, "-m", "munet_jax.data.ircadb", str(tmp_path / "src"),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(tmp_path / "out")) == [
      "segmentation-10.nii.gz", "segmentation-2.nii.gz", "volume-10.nii.gz", "volume-2.nii.gz"]
  assert run.stdout.splitlines()[0].startswith("3Dircadb1.2 -> ")


def _break(patient, how):
  if how == "no patient dicom":
    shutil.rmtree(os.path.join(patient, "PATIENT_DICOM"))
  elif how == "no liver mask":
    shutil.rmtree(os.path.join(patient, "MASKS_DICOM", "liver"))
  elif how == "not dicom":
    with open(os.path.join(patient, "PATIENT_DICOM", "image_3"), "w") as f:
      f.write("hello")
  elif how == "duplicate slice":
    shutil.copy(os.path.join(patient, "PATIENT_DICOM", "image_0"),
                os.path.join(patient, "PATIENT_DICOM", "image_9"))
  elif how == "missing mask slice":
    os.remove(os.path.join(patient, "MASKS_DICOM", "liver", "image_2"))


@pytest.mark.parametrize("how, needle", [
    ("no patient dicom", "no PATIENT_DICOM folder"),
    ("no liver mask", "no 'liver' mask folder"),
    ("not dicom", "image_3: not a readable DICOM image"),
    ("duplicate slice", "at the same position"),
    ("missing mask slice", "liver: mask has 4 of the CT.s 5 slices"),
])
def test_broken_patients_are_user_errors_naming_the_place(tmp_path, how, needle):
  patient, *_ = _make_patient(tmp_path / "src")
  _break(patient, how)
  with pytest.raises(UserError, match=needle):
    ircadb.convert_patient(patient, str(tmp_path / "out"))


def test_folders_that_are_not_3dircadb(tmp_path):
  with pytest.raises(UserError, match="folder not found"):
    ircadb.find_patients(tmp_path / "nope")
  with pytest.raises(UserError, match="no 3Dircadb patient folders"):
    ircadb.find_patients(tmp_path)
  run = subprocess.run([sys.executable, "-m", "munet_jax.data.ircadb", str(tmp_path),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert run.returncode == 2
  assert len(run.stderr.strip().splitlines()) == 1 and str(tmp_path) in run.stderr
