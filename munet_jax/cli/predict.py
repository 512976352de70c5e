"""Segment CT volumes with a trained run (or an ensemble of runs).

  python predict.py --workdir W [W2 ...] --input IN --output OUT [--which latest|best]
      [--output-format nifti|dicom-seg] [--tta] [--save-probabilities]
  python predict.py --onnx model.onnx --input IN --output OUT [the same options]

IN is a NIfTI CT file (OUT the label file to write), a folder of them (OUT a folder;
each output is named after its input, a Decathlon _0000 suffix dropped, as .nii.gz), or
a folder of DICOM CT series (one output per series: OUT itself for one series, else
OUT/SERIES_UID.nii.gz, or .dcm with --output-format dicom-seg). Labels are uint8, 0
background, 1 liver, 2 tumour, on exactly the input's grid (NIfTI: shape, affine,
orientation, header qform/sform; DICOM: the grid of ITK's series reader). Several
workdirs average the softmax of their runs; --tta averages it over in-plane mirrorings;
--save-probabilities writes NAME_probabilities.nii.gz (uint8, softmax x 255, scl_slope
1/255) beside each label file. Each file is written atomically. --onnx runs a model
exported with `python -m munet_jax.export` on onnxruntime instead of a run's checkpoint
(no JAX is imported; the file's metadata holds the HU window and post-processing).

Exit status 0 done, 2 a user error (one line on stderr; --debug shows the traceback),
130 stopped by Ctrl-C (files already written are complete; none is half-written).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.errors import UserError
from munet_jax.prediction import OUTPUT_FORMATS


def parse_args(argv: Sequence[str], prog: str = "predict.py"):
  parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", nargs="+",
                     help="the training run; several: an ensemble (mean softmax)")
  model.add_argument("--onnx", help="a model exported by python -m munet_jax.export, run "
                     "with onnxruntime")
  parser.add_argument("--input", required=True,
                      help="CT .nii / .nii.gz file, a folder of them, or a DICOM folder")
  parser.add_argument("--output", required=True, help="label file, or a folder")
  parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="nifti",
                      help="nifti (default) or dicom-seg (DICOM input only)")
  parser.add_argument("--tta", action="store_true",
                      help="mirror slices along both in-plane axes, mean softmax (4x time)")
  parser.add_argument("--save-probabilities", action="store_true",
                      help="also write NAME_probabilities.nii.gz (uint8 softmax x 255)")
  parser.add_argument("--which", choices=("latest", "best"),
                      help="checkpoint: newest (default), or best validation liver DSC")
  parser.add_argument("--batch-size", type=int, help="slices per batch (default: eval.batch_size)")
  args = parser.parse_args(argv)
  if args.batch_size is not None and args.batch_size < 1:
    raise UserError(f"{prog}: --batch-size must be >= 1, got {args.batch_size}")
  if args.onnx and args.which:
    raise UserError(f"{prog}: --which picks a checkpoint of --workdir; an --onnx file holds "
                    "one model")
  return args


def main(argv: Sequence[str], prog: str = "predict.py") -> int:
  args = parse_args(argv, prog)
  options = dict(batch_size=args.batch_size, output_format=args.output_format,
                 tta=args.tta, save_probabilities=args.save_probabilities)
  try:
    if args.onnx:   # onnxruntime only: JAX is not imported
      from munet_jax.onnx_inference import predict_path as predict_onnx
      logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
      written = predict_onnx(args.onnx, args.input, args.output, **options)
    else:
      from munet_jax.inference import predict_path
      from munet_jax.runtime import configure_jax, configure_logging
      configure_logging()
      configure_jax()
      workdir = args.workdir[0] if len(args.workdir) == 1 else args.workdir
      written = predict_path(workdir, args.input, args.output, which=args.which or "latest",
                             **options)
  except KeyboardInterrupt:
    print("stopped by Ctrl-C; the files already written are complete", file=sys.stderr)
    return 130
  print(f"wrote {len(written)} label volume(s): "
        + (written[0] if len(written) == 1 else args.output))
  return 0


entry = entry_point(lambda argv: main(argv, prog="munet-predict"))
