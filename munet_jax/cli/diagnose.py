"""`munet-diagnose` (also `python -m munet_jax.diagnostics`): permeation rates and skip features.

  munet-diagnose --workdir W [--data DIR] [--split val] [--out DIR]
      [--compare-workdir W2] [--which latest|best] [--max-slices N] [--pooling area|max]
      [--small-lesion-mm MM] [--batch-size B]

writes OUT/permeation.json (every object's rates and the summary per group), OUT/
permeation.png (Fig. 2: rate per stage, small against large objects, mean ± std of the
defined rates, each object a dot, the share at -0.5 annotated) and OUT/skip_features.png
(Fig. 3: for the held-out slice with a small and a large tumour, x_s and r_s per stage;
with --compare-workdir, the second run's skip features beside them). OUT defaults to
WORKDIR/diagnostics. The definitions are in `munet_jax.diagnostics`.
"""

from __future__ import annotations

from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.diagnostics import POOLINGS, diagnose
from munet_jax.errors import UserError
from munet_jax.runtime import configure_jax, configure_logging


def parse_args(argv: Sequence[str], prog: str = "munet-diagnose"):
  p = Parser(prog=prog,
             description="Permeation rates (Eq. 7, Fig. 2) and skip features (Fig. 3) of a "
                         "trained mU-Net, on small and large objects of its data.")
  p.add_argument("--workdir", required=True, help="the training run")
  p.add_argument("--data", help="the data root (default: the run's data.root)")
  p.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                 help="which of the run's splits to look at (default val)")
  p.add_argument("--out", help="output folder (default WORKDIR/diagnostics)")
  p.add_argument("--which", default="latest", choices=("latest", "best"), help="checkpoint")
  p.add_argument("--compare-workdir", help="a second run (e.g. the U-Net) shown in the "
                 "feature picture and measured on the same objects")
  p.add_argument("--max-slices", type=int, default=40,
                 help="slices per volume at most, tumour slices first (default 40)")
  p.add_argument("--pooling", default="area", choices=POOLINGS,
                 help="how object masks reach each stage (default area)")
  p.add_argument("--small-lesion-mm", type=float,
                 help="objects below this squared (mm^2) in a slice are small "
                      "(default: the run's eval.small_lesion_mm, 28)")
  p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
  args = p.parse_args(argv)
  if args.max_slices < 1:
    raise UserError(f"{prog}: --max-slices must be >= 1")
  if args.batch_size < 1:
    raise UserError(f"{prog}: --batch-size must be >= 1")
  if args.small_lesion_mm is not None and not args.small_lesion_mm > 0:
    raise UserError(f"{prog}: --small-lesion-mm must be positive")
  return args


def _format(document: dict) -> str:
  stages = document["stages"]
  lines = [f"{'group':14s}{'objects':>8s}" + "".join(f"{'stage ' + str(s):>16s}" for s in stages)]
  for group in ("small", "large", "tumour_small", "tumour_large", "liver_small", "liver_large"):
    e = document["summary"][group]
    cells = []
    for m, sd, v in zip(e["mean"], e["std"], e["vanished"]):
      cells.append("-" if m is None else f"{m:.2f}±{sd:.2f} ({100 * v:.0f}%)")
    lines.append(f"{group:14s}{e['objects']:>8d}" + "".join(f"{c:>16s}" for c in cells))
  lines.append("(mean ± std of defined rates; in brackets the share at -0.5)")
  return "\n".join(lines)


def main(argv: Sequence[str], prog: str = "munet-diagnose") -> int:
  args = parse_args(argv, prog)
  configure_jax()
  configure_logging()
  document, paths = diagnose(
      args.workdir, data=args.data, split=args.split, out=args.out, which=args.which,
      compare_workdir=args.compare_workdir, max_slices=args.max_slices, pooling=args.pooling,
      small_lesion_mm=args.small_lesion_mm, batch_size=args.batch_size)
  print(_format(document))
  print("wrote " + ", ".join(paths))
  return 0


entry = entry_point(main)

if __name__ == "__main__":
  entry()
