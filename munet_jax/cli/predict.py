"""Segment CT volumes with a trained run (or an ensemble of runs).

  python predict.py --workdir W [W2 ...] --input IN --output OUT [--which latest|best]
      [--output-format nifti|dicom-seg] [--tta] [--save-probabilities]

IN is a NIfTI CT file (OUT the label file to write), a folder of them (OUT a folder;
each output is named after its input, a Decathlon _0000 suffix dropped, as .nii.gz), or
a folder of DICOM CT series (one output per series: OUT itself for one series, else
OUT/SERIES_UID.nii.gz, or .dcm with --output-format dicom-seg). Labels are uint8, 0
background, 1 liver, 2 tumour, on exactly the input's grid (NIfTI: shape, affine,
orientation, header qform/sform; DICOM: the grid of ITK's series reader). Several
workdirs average the softmax of their runs; --tta averages it over in-plane mirrorings;
--save-probabilities writes NAME_probabilities.nii.gz (uint8, softmax x 255, scl_slope
1/255) beside each label file. Each file is written atomically.

Exit status 0 done, 2 a user error (one line on stderr; --debug shows the traceback),
130 stopped by Ctrl-C (files already written are complete; none is half-written).
"""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.errors import UserError
from munet_jax.inference import predict_path
from munet_jax.prediction import OUTPUT_FORMATS
from munet_jax.runtime import configure_jax, configure_logging


def parse_args(argv: Sequence[str], prog: str = "predict.py"):
  parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, nargs="+",
                      help="the training run; several: an ensemble (mean softmax)")
  parser.add_argument("--input", required=True,
                      help="CT .nii / .nii.gz file, a folder of them, or a DICOM folder")
  parser.add_argument("--output", required=True, help="label file, or a folder")
  parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="nifti",
                      help="nifti (default) or dicom-seg (DICOM input only)")
  parser.add_argument("--tta", action="store_true",
                      help="mirror slices along both in-plane axes, mean softmax (4x time)")
  parser.add_argument("--save-probabilities", action="store_true",
                      help="also write NAME_probabilities.nii.gz (uint8 softmax x 255)")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="checkpoint: newest, or best validation liver DSC")
  parser.add_argument("--batch-size", type=int, help="slices per batch (default: eval.batch_size)")
  args = parser.parse_args(argv)
  if args.batch_size is not None and args.batch_size < 1:
    raise UserError(f"{prog}: --batch-size must be >= 1, got {args.batch_size}")
  return args


def main(argv: Sequence[str], prog: str = "predict.py") -> int:
  args = parse_args(argv, prog)
  configure_logging()
  configure_jax()
  try:
    workdir = args.workdir[0] if len(args.workdir) == 1 else args.workdir
    written = predict_path(workdir, args.input, args.output, which=args.which,
                           batch_size=args.batch_size, output_format=args.output_format,
                           tta=args.tta, save_probabilities=args.save_probabilities)
  except KeyboardInterrupt:
    print("stopped by Ctrl-C; the files already written are complete", file=sys.stderr)
    return 130
  print(f"wrote {len(written)} label volume(s): "
        + (written[0] if len(written) == 1 else args.output))
  return 0


entry = entry_point(lambda argv: main(argv, prog="munet-predict"))
