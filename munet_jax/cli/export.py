"""Export a training run's model for inference without the training stack.

  python -m munet_jax.export --workdir W --out model.onnx [--which latest|best]
  python -m munet_jax.export --workdir W --out model.jaxexport --format jax [--shape H W]

ONNX (default): preprocessed slices (N, H, W, 1) float32 -> logits (N, H, W, classes),
any N, H and W, float32 compute; its metadata holds what `predict.py --onnx` needs (the
HU window, the classes, the run's post-processing). jax: a serialized jax.export.Exported
of the same function, any batch, slices of H x W (default: the run's data.image_size).
The file is written atomically.

Exit status 0 done, 2 a user error (one line on stderr; --debug shows the traceback).
"""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point, run
from munet_jax.errors import UserError
from munet_jax.export import export
from munet_jax.runtime import configure_jax, configure_logging


def parse_args(argv: Sequence[str], prog: str):
  parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run")
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--format", choices=("onnx", "jax"), default="onnx",
                      help="onnx (default; for onnxruntime) or jax (jax.export)")
  parser.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                      help="slice size of --format jax (default: the run's data.image_size)")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="checkpoint: newest, or best validation liver DSC")
  args = parser.parse_args(argv)
  if args.shape and args.format == "onnx":
    raise UserError(f"{prog}: --shape is for --format jax; the ONNX model takes any slice "
                    "size")
  if args.shape and min(args.shape) < 1:
    raise UserError(f"{prog}: --shape must be two sizes >= 1, got {args.shape}")
  return args


def main(argv: Sequence[str], prog: str = "python -m munet_jax.export") -> int:
  args = parse_args(argv, prog)
  configure_logging()
  configure_jax()
  info = export(args.workdir, args.out, which=args.which, format=args.format,
                shape=tuple(args.shape) if args.shape else None)
  shape = " x ".join(str(d) for d in info["shape"])
  note = ("" if info["trained_dtype"] == "float32"
          else f"; computes in float32 (the run's model.dtype is {info['trained_dtype']})")
  print(f"wrote {info['path']}: {info['format']}, checkpoint step {info['step']}, slices "
        f"{shape} x 1 -> logits, {_size(info['bytes'])}{note}")
  return 0


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


entry = entry_point(lambda argv: main(argv, prog="munet-export"))

if __name__ == "__main__":
  sys.exit(run(main))
