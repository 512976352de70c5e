"""`munet-prepare ROOT` (also `python -m munet_jax.data.prepare`): the slice store, ahead.

Reads every case once (with the validation of `munet_jax.data.nifti`) into the
memory-mapped store that training reads (`munet_jax.data.store`); cases already prepared
from unchanged files are re-used. Training does the same by itself; this command lets it
be done ahead, e.g. once on a login node. A bad case stops it with exit status 2 and one
stderr line naming the file, leaving no half-written entry; `--skip-bad` leaves bad cases
out instead and lists them.
"""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.data import discovery, store
from munet_jax.errors import UserError


def main(argv: Sequence[str], prog: str = "munet-prepare") -> int:
  parser = Parser(
      prog=prog,
      description="Prepare the slice store (memory-mapped int16 slices) of a data folder. "
                  "Add --debug to see a traceback.")
  parser.add_argument("root", help="data folder (LiTS or Decathlon layout)")
  parser.add_argument("--cache-dir", default=None,
                      help="store folder (default: ROOT/.munet_cache, as data.cache_dir)")
  parser.add_argument("--skip-bad", action="store_true",
                      help="leave bad cases out (listed on stderr) instead of stopping")
  args = parser.parse_args(argv)
  cases = discovery.find_cases(args.root)
  cache_dir = args.cache_dir or store.default_cache_dir(args.root)
  slice_store = store.prepare_store(cases, cache_dir, skip_bad=args.skip_bad,
                                    progress=sys.stderr.isatty())
  if not slice_store.volumes:   # one line, as every error: the first case's reason
    name, reason = slice_store.skipped[0]
    raise UserError(f"{args.root}: every case is bad, nothing was prepared ({name}: {reason})")
  for name, reason in slice_store.skipped:
    print(f"skipped {name}: {reason}", file=sys.stderr)
  liver = sum(sum(b - a for a, b in v.liver) for v in slice_store.volumes)
  tumour = sum(sum(b - a for a, b in v.tumour) for v in slice_store.volumes)
  print(f"{slice_store.cache_dir}: {len(slice_store)} volumes, {slice_store.num_slices} "
        f"slices ({liver} with liver, {tumour} with tumour)"
        + (f", {len(slice_store.skipped)} skipped" if slice_store.skipped else ""))
  return 0


entry = entry_point(main)

if __name__ == "__main__":
  entry()
