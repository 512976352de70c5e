"""predict.py's inputs and outputs, without a model: what to read, what to write, where.

Inputs are NIfTI CT files (a file, or a folder of them) or DICOM CT series (a folder
holding no NIfTI file: every series in it, `munet_jax.dicom`). Outputs are uint8 label
volumes, NIfTI on exactly the input's grid (for a series: the grid of its conversion by
ITK's series reader) or DICOM Segmentation objects referencing the series
(`munet_jax.dicom_seg`), and, when asked, the per-class softmax beside the labels.

The model comes in as a function, `segment(hu, probabilities) -> (labels, probabilities
or None)` on RAS (X, Y, Z) volumes (`inference.predict_path` hands it a
`VolumeSegmenter`), so this module imports no JAX.

Probabilities are written as a 4-D NIfTI file NAME_probabilities.nii.gz, (X, Y, Z,
classes) on the labels' grid, uint8 with scl_slope 1/255: a reader that applies the
header's scaling (nibabel's `get_fdata`, ITK, 3D Slicer) gets the softmax back to within
1/510 (half a step). The labels are the argmax of the unrounded softmax.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from tqdm import tqdm

from munet_jax import dicom, dicom_seg
from munet_jax.atomic import atomic_output
from munet_jax.data import discovery, nifti
from munet_jax.data.volumes import prefetch
from munet_jax.errors import UserError

OUTPUT_FORMATS = ("nifti", "dicom-seg")
PROBABILITY_SCALE = 255          # probabilities are stored as round(p * 255), uint8
_LITS_LABEL = re.compile(r"^segmentation-\d+\.nii(\.gz)?$")
_PROBABILITIES = "_probabilities.nii.gz"

Segment = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Job:
  """One volume to segment.

  Attributes:
    source: the CT file, or a DICOM series' first file.
    output: the label file to write (.nii / .nii.gz, or .dcm for DICOM-SEG).
    series: the DICOM series (None for NIfTI input).
    probabilities: where the softmax goes (None: not asked for).
  """
  source: str
  output: str
  series: dicom.Series | None = None
  probabilities: str | None = None


def plan_outputs(input_path: str, output_path: str) -> list[tuple[str, str]]:
  """(input CT file, output label file) pairs for NIfTI input; checks the paths.

  A file in gives the file `output_path` (or, when `output_path` is an existing folder,
  CASE.nii.gz in it); a folder in gives OUTPUT/CASE.nii.gz for every NIfTI file of it,
  CASE being the input's name without a Decathlon `_0000` suffix. LiTS label files
  (segmentation-N.nii[.gz]) in an input folder are left out.
  """
  if not os.path.exists(input_path):
    raise UserError(f"{input_path}: --input not found")
  if os.path.isdir(input_path):
    inputs = discovery.list_nifti(input_path)
    # A LiTS folder holds its label files beside the CT: segmentation-N is not a CT.
    labels = [p for p in inputs if _LITS_LABEL.match(os.path.basename(p))]
    if labels:
      inputs = [p for p in inputs if p not in labels]
      print(f"note: {len(labels)} LiTS label file(s) (segmentation-N) in {input_path} "
            "are not CT and are left out", file=sys.stderr)
    if not inputs:
      raise UserError(f"{input_path}: no NIfTI files (*.nii, *.nii.gz) in the --input folder")
    if os.path.exists(output_path) and not os.path.isdir(output_path):
      raise UserError(f"{output_path}: --output must be a folder when --input is a folder")
    for path in inputs:
      suffix = re.search(r"_(\d{4})\.nii(\.gz)?$", os.path.basename(path))
      if suffix and suffix.group(1) != "0000":
        raise UserError(f"{path}: only single-channel CT is supported (channel "
                        f"{suffix.group(1)}; expected NAME.nii.gz or NAME_0000.nii.gz)")
    pairs = [(p, os.path.join(output_path, discovery.case_name(p) + ".nii.gz")) for p in inputs]
  else:
    if not discovery.is_nifti(input_path):
      raise UserError(f"{input_path}: --input must be a .nii or .nii.gz file or a folder")
    if os.path.isdir(output_path):
      pairs = [(input_path, os.path.join(output_path, discovery.case_name(input_path) + ".nii.gz"))]
    elif not output_path.endswith(discovery.NIFTI_SUFFIXES):
      raise UserError(f"{output_path}: --output must end in .nii or .nii.gz "
                      "(or be an existing folder) when --input is a file")
    else:
      pairs = [(input_path, output_path)]
  _check_distinct([p for p, _ in pairs], pairs)
  return pairs


def _check_distinct(inputs: Sequence[str], pairs: Sequence[tuple[str, str]]) -> None:
  seen: dict[str, str] = {}
  inputs_real = {os.path.realpath(p) for p in inputs}
  for src, dst in pairs:
    real = os.path.realpath(dst)
    if real in inputs_real:
      raise UserError(f"{dst}: output would overwrite an input CT file; choose another --output")
    if real in seen:
      raise UserError(f"{src}: gives the same output name {dst} as {seen[real]}")
    seen[real] = src


def is_dicom_input(input_path: str) -> bool:
  """True for a folder that holds no NIfTI file directly (it is read as DICOM)."""
  return os.path.isdir(input_path) and not discovery.list_nifti(input_path)


def plan(input_path: str, output_path: str, output_format: str = "nifti",
         save_probabilities: bool = False) -> list[Job]:
  """The jobs of one predict.py call; every path and every DICOM header checked first.

  NIfTI input: as `plan_outputs`. DICOM input (a folder without NIfTI files): one output
  per series, `output_path` itself when there is one series and it names a file of the
  format (.nii / .nii.gz, or .dcm for DICOM-SEG), else OUTPUT/SERIES_UID.nii.gz (.dcm).

  Raises:
    UserError naming the path: any problem of `plan_outputs` or `dicom.find_series`,
    DICOM-SEG asked for NIfTI input, an output name of the wrong kind.
  """
  if output_format not in OUTPUT_FORMATS:
    raise UserError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, "
                    f"got {output_format!r}")
  if not os.path.exists(input_path):
    raise UserError(f"{input_path}: --input not found")
  if not is_dicom_input(input_path):
    if output_format == "dicom-seg":
      raise UserError(f"{input_path}: --output-format dicom-seg needs a DICOM series as "
                      "--input (a folder of DICOM files); this is NIfTI")
    pairs = plan_outputs(input_path, output_path)
    jobs = [Job(src, dst) for src, dst in pairs]
  else:
    series = dicom.find_series(input_path)
    suffixes = discovery.NIFTI_SUFFIXES if output_format == "nifti" else (".dcm",)
    ext = suffixes[0]
    names_a_file = output_path.endswith((*discovery.NIFTI_SUFFIXES, ".dcm"))
    if names_a_file and not os.path.isdir(output_path):
      if not output_path.endswith(suffixes):
        raise UserError(f"{output_path}: --output for --output-format {output_format} must "
                        f"end in {' or '.join(suffixes)} (or be a folder)")
      if len(series) > 1:
        raise UserError(f"{output_path}: --input {input_path} holds {len(series)} series; "
                        "--output must be a folder (one file per series)")
      outputs = [output_path]
    else:
      if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise UserError(f"{output_path}: --output must be a folder or a {ext} file")
      outputs = [os.path.join(output_path, s.uid + ext) for s in series]
    jobs = [Job(s.files[0], out, s) for s, out in zip(series, outputs)]
    _check_distinct([f for s in series for f in s.files], [(j.source, j.output) for j in jobs])
  if save_probabilities:
    jobs = [dataclasses.replace(j, probabilities=probabilities_path(j.output)) for j in jobs]
    _check_distinct([j.source for j in jobs] + [j.output for j in jobs],
                    [(j.source, j.probabilities) for j in jobs])
  return jobs


def probabilities_path(labels_path: str) -> str:
  """NAME_probabilities.nii.gz beside the label file NAME.nii.gz (or NAME.nii, NAME.dcm)."""
  for suffix in (*discovery.NIFTI_SUFFIXES, ".dcm"):
    if labels_path.endswith(suffix):
      return labels_path[:-len(suffix)] + _PROBABILITIES
  return labels_path + _PROBABILITIES


def read_job(job: Job) -> nifti.Volume:
  """The CT of a job: its NIfTI file, or its DICOM series (a Volume without a header)."""
  if job.series is not None:
    return dicom.read_series(job.series)
  return nifti.read_image(job.source)


def run(jobs: Sequence[Job], segment: Segment, progress: bool | None = None) -> list[str]:
  """Reads, segments and writes every job; the next volume is read while one is segmented.

  Args:
    jobs: from `plan`.
    segment: `(hu (X, Y, Z) RAS, probabilities: bool) -> (labels (X, Y, Z) uint8,
      (X, Y, Z, classes) uint8 probabilities x 255 or None)`.
    progress: a progress bar over volumes; None: only on a terminal.

  Returns:
    The label files written, each atomically (and its probabilities file, if asked).
  """
  written = []
  volumes = prefetch(functools.partial(read_job, job) for job in jobs)
  bar = tqdm(jobs, desc="predict", unit="volume", leave=False,
             disable=None if progress is None else not progress)
  with bar:
    for job, image in zip(bar, volumes):
      bar.set_postfix_str(os.path.basename(job.source), refresh=False)
      labels_ras, probs_ras = segment(nifti.to_ras(image.data, image.affine),
                                      job.probabilities is not None)
      labels = nifti.from_ras(labels_ras, image.affine)
      if job.output.endswith(".dcm"):
        dicom_seg.write_segmentation(job.output, labels, job.series)
      else:
        nifti.write_label(job.output, labels, like=image)
      if job.probabilities is not None:
        write_probabilities(job.probabilities, nifti.from_ras(probs_ras, image.affine), image)
      written.append(job.output)
  return written


def write_probabilities(path: str, probabilities: np.ndarray, like: nifti.Volume) -> None:
  """Writes (X, Y, Z, classes) uint8 probabilities x 255 on `like`'s grid, atomically."""
  probabilities = np.asarray(probabilities)
  if probabilities.ndim != 4 or probabilities.shape[:3] != like.data.shape:
    raise ValueError(f"probabilities of shape {probabilities.shape} for {path} do not match "
                     f"the image shape {like.data.shape}")
  if isinstance(like.header, nib.Nifti1Header):
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header["cal_min"], header["cal_max"] = 0, 1
    header["intent_code"] = 0
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(probabilities.astype(np.uint8), like.affine, header=header)
  else:
    img = nib.Nifti1Image(probabilities.astype(np.uint8), like.affine)
    img.header.set_qform(like.affine, code=1)
    img.header.set_sform(like.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
  img.header.set_slope_inter(1.0 / PROBABILITY_SCALE, 0.0)
  img.header["descrip"] = b"softmax per class (background, liver, tumour)"
  with atomic_output(path, ".nii.gz" if path.endswith(".nii.gz") else ".nii") as tmp:
    nib.save(img, tmp)
