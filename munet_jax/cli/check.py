"""`munet-check ROOT` (also `python -m munet_jax.data.check`): validate a data folder."""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.data.check import check_root


def main(argv: Sequence[str], prog: str = "munet-check") -> int:
  parser = Parser(
      prog=prog,
      description="Validate every CT volume and label of a data folder (LiTS or Decathlon "
                  "layout). Add --debug to see a traceback.")
  parser.add_argument("root", help="data folder")
  parser.add_argument("--no-labels", action="store_true",
                      help="images only (prediction inputs): labels are optional")
  args = parser.parse_args(argv)
  summary = check_root(args.root, require_labels=not args.no_labels,
                       progress=sys.stderr.isatty())
  print(summary.line(args.root))
  return 0


entry = entry_point(main)

if __name__ == "__main__":
  entry()
