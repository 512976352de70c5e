"""Score segmentations: the paper's table on the terminal, every number in results.json.

  python eval.py --workdir W [--data DIR] [--split test] [--which latest|best] [--overlays N]
      [--tta]
      segments every volume of the split with W's checkpoint; writes W/eval/results.json.
  python eval.py --workdir W1 W2 ... --out F.json [--split test]
      the same with an ensemble: the mean softmax of the runs (a split they all share).
  python eval.py --pred P --ref R --out F.json [--images CT_DIR] [--overlays N]
      scores the NIfTI label files in P against those of the same name in R (no model).
  Either takes --metrics dsc,voe,rvd,assd,mssd,hd95,nsd (the table's columns; default the
  paper's five) and --nsd-tolerance-mm T.

Exit status 0 done, 2 a user error (one line on stderr; --debug shows the traceback),
130 stopped by Ctrl-C (no results file is left half-written).
"""

from __future__ import annotations

import sys
from typing import Sequence

from munet_jax import evaluation
from munet_jax.cli import Parser, entry_point
from munet_jax.errors import UserError
from munet_jax.runtime import configure_jax, configure_logging


def parse_args(argv: Sequence[str], prog: str = "eval.py"):
  parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
  run = parser.add_argument_group("a training run's checkpoint on its data")
  run.add_argument("--workdir", nargs="+",
                   help="the training run; several: an ensemble (mean softmax; needs --out)")
  run.add_argument("--tta", action="store_true", default=None,
                   help="mirror slices along both in-plane axes, mean softmax (4x time)")
  run.add_argument("--data", help="data root (default: the run's config data.root)")
  run.add_argument("--split", choices=("train", "val", "test", "all"), default=None,
                   help="cases by the run's config data.split, or all (default: test)")
  run.add_argument("--which", choices=("latest", "best"), default=None,
                   help="checkpoint: newest, or best validation liver DSC (default: latest)")
  run.add_argument("--batch-size", type=int, help="slices per batch (default: eval.batch_size)")
  files = parser.add_argument_group("label files against reference files")
  files.add_argument("--pred", help="predicted label file or folder")
  files.add_argument("--ref", help="reference label file or folder (same file names)")
  files.add_argument("--images", help="CT folder, for the background of --overlays")
  parser.add_argument("--out", help="results file (required with --pred; default with "
                      "--workdir: W/eval/results.json)")
  parser.add_argument("--small-lesion-mm", type=float, default=None,
                      help="a lesion is small when its largest axial area is below this "
                      "squared, in mm² (default: the run's eval.small_lesion_mm, else 28)")
  parser.add_argument("--nsd-tolerance-mm", type=float, default=None,
                      help="tolerance of the normalised surface Dice, in mm (default: the "
                      "run's eval.nsd_tolerance_mm, else 2)")
  parser.add_argument("--metrics", default=None,
                      help="the table's columns, comma-separated, from "
                      "dsc,voe,rvd,assd,mssd,rmsd,hd95,nsd (default: the paper's "
                      "dsc,voe,rvd,assd,mssd); results.json always holds all of them")
  parser.add_argument("--overlays", type=int, default=0, metavar="N",
                      help="overlay PNGs of N chosen slices per case, in overlays/ next to "
                      "the results file (default 0: none)")
  args = parser.parse_args(argv)
  if (args.workdir is None) == (args.pred is None):
    raise UserError(f"{prog}: give either --workdir W or --pred P --ref R --out F.json")
  if args.overlays < 0:
    raise UserError(f"{prog}: --overlays must be >= 0, got {args.overlays}")
  if args.batch_size is not None and args.batch_size < 1:
    raise UserError(f"{prog}: --batch-size must be >= 1, got {args.batch_size}")
  if args.workdir is not None:
    for flag in ("ref", "images"):
      if getattr(args, flag) is not None:
        raise UserError(f"{prog}: --{flag} goes with --pred, not with --workdir")
  else:
    if args.ref is None or args.out is None:
      raise UserError(f"{prog}: --pred needs --ref R and --out F.json")
    for flag in ("data", "split", "which", "batch_size", "tta"):
      if getattr(args, flag) is not None:
        raise UserError(f"{prog}: --{flag.replace('_', '-')} goes with --workdir, not with --pred")
  if args.small_lesion_mm is not None and not args.small_lesion_mm > 0:
    raise UserError(f"{prog}: --small-lesion-mm must be positive, got {args.small_lesion_mm}")
  if args.nsd_tolerance_mm is not None and not 0 <= args.nsd_tolerance_mm < float("inf"):
    raise UserError(f"{prog}: --nsd-tolerance-mm must be non-negative and finite, got "
                    f"{args.nsd_tolerance_mm}")
  if args.metrics is not None:
    try:
      args.metrics = evaluation.table_metrics(args.metrics)
    except UserError as e:
      raise UserError(f"{prog}: --metrics: {e}") from None
  if args.workdir is not None and len(args.workdir) > 1 and args.out is None:
    raise UserError(f"{prog}: an ensemble of {len(args.workdir)} runs needs --out F.json")
  if args.out is not None and not args.out.endswith(".json"):
    raise UserError(f"{args.out}: --out must be a .json file")
  return args


def main(argv: Sequence[str], prog: str = "eval.py") -> int:
  args = parse_args(argv, prog)
  configure_logging()
  try:
    if args.workdir is not None:
      configure_jax()
      document, out = evaluation.evaluate_run(
          args.workdir[0] if len(args.workdir) == 1 else args.workdir, data=args.data, split=args.split or "test",
          which=args.which or "latest", out=args.out, overlays=args.overlays,
          batch_size=args.batch_size, small_lesion_mm=args.small_lesion_mm,
          nsd_tolerance_mm=args.nsd_tolerance_mm, tta=bool(args.tta))
      source = document["source"]
      title = (f"{source['split']} split, {len(document['cases'])} volumes, checkpoint step "
               f"{source['checkpoint_step']} ({source['which']})")
      if "ensemble" in source:
        title = (f"{source['split']} split, {len(document['cases'])} volumes, ensemble of "
                 f"{len(source['ensemble'])} runs ({source['which']} checkpoints)")
    else:
      document = evaluation.evaluate_folders(
          args.pred, args.ref, args.out,
          small_lesion_mm=28.0 if args.small_lesion_mm is None else args.small_lesion_mm,
          nsd_tolerance_mm=(evaluation.DEFAULT_NSD_TOLERANCE if args.nsd_tolerance_mm is None
                            else args.nsd_tolerance_mm),
          overlays=args.overlays, images=args.images)
      out = args.out
      title = f"{len(document['cases'])} volumes"
  except KeyboardInterrupt:
    print("stopped by Ctrl-C; no results written", file=sys.stderr)
    return 130
  print(f"{title} (results in {out}):")
  print(evaluation.format_table(document, args.metrics or evaluation.TABLE_METRICS),
        flush=True)
  return 0


entry = entry_point(lambda argv: main(argv, prog="munet-eval"))
