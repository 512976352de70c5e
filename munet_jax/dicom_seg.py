"""DICOM Segmentation out: a label volume as a DICOM-SEG object referencing its CT series.

Written with highdicom as a BINARY segmentation of two segments that do not overlap,
exactly the label map: segment 1 "Liver" (label 1; SNOMED CT 10200004 Liver, category
91772007 Organ) and segment 2 "Liver tumour" (label 2; SNOMED CT 108369006 Neoplasm,
category 49755003 Morphologically Abnormal Structure, anatomic region Liver). The liver of
the metrics is both segments together. Each frame references the SOP instance of its CT
slice; slices without a label are left out (highdicom's default).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from munet_jax import __version__, dicom
from munet_jax.atomic import atomic_output
from munet_jax.labels import LIVER, TUMOUR

ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="munet-jax mU-Net", version=__version__, family=codes.DCM.ArtificialIntelligence)


def segment_descriptions() -> list[hd.seg.SegmentDescription]:
  """The two segments, numbered as the labels (1 liver, 2 tumour)."""
  return [
      hd.seg.SegmentDescription(
          segment_number=LIVER, segment_label="Liver",
          segmented_property_category=codes.SCT.Organ,
          segmented_property_type=codes.SCT.Liver,
          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
          algorithm_identification=ALGORITHM),
      hd.seg.SegmentDescription(
          segment_number=TUMOUR, segment_label="Liver tumour",
          segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
          segmented_property_type=codes.SCT.Neoplasm,
          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
          algorithm_identification=ALGORITHM,
          anatomic_regions=[codes.SCT.Liver]),
  ]


def build_segmentation(labels: np.ndarray, series: dicom.Series) -> hd.seg.Segmentation:
  """The DICOM-SEG dataset of `labels` on `series`.

  Args:
    labels: (columns, rows, slices) uint8 0/1/2, in the series' voxel order
      (`dicom.read_series`).
    series: the CT series the labels were predicted on.
  """
  labels = np.asarray(labels, np.uint8)
  if labels.shape != series.shape:
    raise ValueError(f"labels of shape {labels.shape} do not match series {series.uid} "
                     f"of shape {series.shape}")
  sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
  frames = np.ascontiguousarray(labels.transpose(2, 1, 0))   # (slices, rows, columns)
  return hd.seg.Segmentation(
      source_images=sources, pixel_array=frames,
      segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
      segment_descriptions=segment_descriptions(),
      series_instance_uid=hd.UID(), series_number=_series_number(sources[0]),
      sop_instance_uid=hd.UID(), instance_number=1,
      manufacturer="munet-jax", manufacturer_model_name="mU-Net",
      software_versions=__version__, device_serial_number="none",
      series_description="mU-Net liver and tumour", content_label="MUNET",
      content_description="liver and liver tumour, mU-Net")


def _series_number(source) -> int:
  try:
    return int(source.SeriesNumber) + 1000   # a new series beside the CT's
  except (AttributeError, TypeError, ValueError):
    return 1000


def write_segmentation(path: str, labels: np.ndarray, series: dicom.Series) -> None:
  """Writes `build_segmentation(labels, series)` to `path` (.dcm), atomically."""
  seg = build_segmentation(labels, series)
  with atomic_output(path, ".dcm") as tmp:
    seg.save_as(tmp)


def read_labels(path: str, series: dicom.Series) -> np.ndarray:
  """A DICOM-SEG file written by `write_segmentation` back as (columns, rows, slices) labels."""
  seg = hd.seg.segread(path)
  pixels = seg.get_pixels_by_source_instance(
      source_sop_instance_uids=list(series.sop_instance_uids), combine_segments=True,
      ignore_spatial_locations=True)
  return np.ascontiguousarray(np.asarray(pixels, np.uint8).transpose(2, 1, 0))
