"""`munet-ircadb SRC OUT` (also `python -m munet_jax.data.ircadb`): 3Dircadb-01 to NIfTI."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import tqdm

from munet_jax.cli import Parser, entry_point
from munet_jax.data.ircadb import convert_patient, find_patients


def main(argv: Sequence[str], prog: str = "munet-ircadb") -> int:
  parser = Parser(
      prog=prog,
      description="Convert 3Dircadb-01 DICOM (3Dircadb1.N/PATIENT_DICOM, MASKS_DICOM) to "
                  "LiTS-layout NIfTI (volume-N.nii.gz, segmentation-N.nii.gz).")
  parser.add_argument("src", help="folder holding 3Dircadb1.N folders, or one of them")
  parser.add_argument("out", help="output folder")
  args = parser.parse_args(argv)
  patients = find_patients(args.src)
  for patient in tqdm.tqdm(patients, desc="3Dircadb", unit="patient",
                           disable=not sys.stderr.isatty()):
    s = convert_patient(patient, args.out)
    print(f"{os.path.basename(patient)} -> {s['image']} "
          f"({'x'.join(map(str, s['shape']))} voxels, "
          f"{' x '.join(f'{v:.2f}' for v in s['spacing'])} mm, liver {s['liver_ml']:.0f} ml, "
          f"tumour {s['tumour_ml']:.1f} ml)")
  return 0


entry = entry_point(main)

if __name__ == "__main__":
  entry()
