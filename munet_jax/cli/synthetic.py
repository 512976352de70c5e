"""`munet-synthetic --out DIR` (also `python -m munet_jax.data.synthetic`): synthetic CT."""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.data.synthetic import write_dataset


def main(argv: Sequence[str], prog: str = "munet-synthetic") -> int:
  parser = Parser(
      prog=prog,
      description="Write a synthetic CT data set (LiTS layout: volume-N.nii.gz, "
                  "segmentation-N.nii.gz).")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--cases", type=int, default=12, help="number of cases (default 12)")
  parser.add_argument("--size", type=int, default=64, help="in-plane size (default 64)")
  parser.add_argument("--slices", type=int, default=None,
                      help="slices per volume (default: from 1-5 mm slice thickness)")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--crop", type=int, default=0,
                      help="keep a CROP x CROP liver-region window (default 0: the whole slice)")
  parser.add_argument("--tumour-rate", type=float, default=2.5,
                      help="lesions per case with tumour: 1 + Poisson(RATE) (default 2.5)")
  parser.add_argument("--voxel-noise", action="store_true",
                      help="scale the noise with the voxel volume (levels given for a "
                           "0.75 x 0.75 x 5 mm voxel)")
  parser.add_argument("--low-contrast-rate", type=float, default=0.2,
                      help="share of low-contrast cases: tumours at 0.4 of their contrast, "
                           "more noise (default 0.2)")
  args = parser.parse_args(argv)
  paths = write_dataset(args.out, args.cases, args.size, args.seed, args.slices,
                        progress=sys.stderr.isatty(), crop=args.crop,
                        tumour_rate=args.tumour_rate, voxel_noise=args.voxel_noise,
                        low_contrast_rate=args.low_contrast_rate)
  print(f"{args.out}: wrote {len(paths)} synthetic cases ({args.size}x{args.size}, "
        f"seed {args.seed})")
  return 0


entry = entry_point(main)

if __name__ == "__main__":
  entry()
