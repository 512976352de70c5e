"""Segment CT volumes with a trained run.

  python predict.py --workdir W --input IN --output OUT [--which latest|best]

IN is a NIfTI CT file (OUT the label file to write) or a folder of them (OUT a folder;
each output is named after its input, a Decathlon _0000 suffix dropped, as .nii.gz).
Labels are uint8, 0 background, 1 liver, 2 tumour, on exactly the input's grid (shape,
affine, orientation, header qform/sform). Each file is written atomically.

Exit status 0 done, 2 a user error (one line on stderr; --debug shows the traceback),
130 stopped by Ctrl-C (files already written are complete; none is half-written).
"""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.errors import UserError
from munet_jax.inference import predict_path
from munet_jax.runtime import configure_jax, configure_logging


def parse_args(argv: Sequence[str], prog: str = "predict.py"):
  parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run")
  parser.add_argument("--input", required=True, help="CT .nii / .nii.gz file, or a folder")
  parser.add_argument("--output", required=True, help="label file, or a folder")
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
    written = predict_path(args.workdir, args.input, args.output, which=args.which,
                           batch_size=args.batch_size)
  except KeyboardInterrupt:
    print("stopped by Ctrl-C; the files already written are complete", file=sys.stderr)
    return 130
  print(f"wrote {len(written)} label volume(s): "
        + (written[0] if len(written) == 1 else args.output))
  return 0


entry = entry_point(lambda argv: main(argv, prog="munet-predict"))
