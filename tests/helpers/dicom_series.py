"""Small CT series written with pydicom, one file per slice, for the DICOM tests.

`write_series(folder, hu, ...)` writes `hu` (columns, rows, slices) as an uncompressed CT
series: slice k at origin + k * dz * normal (LPS, mm), normal = row x col. Stored values
are (hu - intercept) / slope as uint16 (or int16 when negative values remain).
"""

import os

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_series(folder, hu, spacing=(0.8, 0.8, 2.5), origin=(-100.0, -120.0, 50.0),
                 row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), slope=1.0, intercept=-1024.0,
                 series_uid=None, file_order=None, modality="CT", edit=None,
                 study_uid=None, names="slice-{:03d}.dcm"):
  """Writes the series; returns its files, slice 0 first.

  Args:
    hu: (columns, rows, slices) Hounsfield units.
    spacing: (column spacing, row spacing, slice spacing) in mm.
    file_order: a permutation of the slices: file number n holds slice file_order[n]
      (tests of sorting by position); None keeps the slice order.
    edit: optional `edit(k, dataset)` called on slice k before it is written.
  """
  os.makedirs(folder, exist_ok=True)
  hu = np.asarray(hu)
  columns, rows, n = hu.shape
  row, col = np.asarray(row, float), np.asarray(col, float)
  normal = np.cross(row, col)
  series_uid = series_uid or generate_uid()
  study_uid = study_uid or generate_uid()
  frame_uid = generate_uid()
  stored = np.round((hu.astype(np.float64) - intercept) / slope)
  dtype = np.uint16 if stored.min() >= 0 else np.int16
  order = list(range(n)) if file_order is None else list(file_order)
  paths = [None] * n
  for number, k in enumerate(order):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Test^Phantom", "PHANTOM-1"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 3, number + 1
    ds.Manufacturer = "munet-jax tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]   # row spacing, column spacing
    ds.SliceThickness = float(spacing[2])
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0 if dtype == np.uint16 else 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.KVP = 120
    ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(dtype)).tobytes()
    if edit is not None:
      edit(k, ds)
    path = os.path.join(folder, names.format(number))
    ds.save_as(path, enforce_file_format=True)
    paths[k] = path
  return paths
