"""`train.py` / `munet-train`: flags in, `train_and_evaluate` out, with the exit statuses users script on.

Exit status: 0 done; 2 a user error (one line on stderr); 3 the loss stopped being
finite (the last good checkpoint is kept); 130 / 143 stopped by Ctrl-C / SIGTERM after
saving a checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from munet_jax.cli import Parser, entry_point
from munet_jax.config import apply_overrides, load_config_file
from munet_jax.errors import UserError
from munet_jax.runtime import configure_jax, configure_logging, initialize_distributed
from munet_jax.training import loop
from munet_jax.training.lock import hold_workdir


def parse_args(argv: Sequence[str], prog: str = "train.py"):
  parser = Parser(prog=prog, description="Train mU-Net on a CT data set.")
  parser.add_argument("--config", required=True, help="an ml_collections config file")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and results")
  parser.add_argument("--skip-bad", action="store_true",
                      help="leave bad cases of the data folder out (listed on stderr and in "
                      "the results) instead of stopping; the same as "
                      "--config.data.skip_bad=True")
  parser.add_argument("--coordinator", help="multi-host: host:port of process 0 "
                      "(automatic on SLURM and Cloud TPU)")
  parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
  parser.add_argument("--local-devices", help="multi-host: comma-separated local device ids")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      raise UserError(f"{prog}: unrecognised argument '{item}'")
    overrides.append(item[len("--config."):])
  return args, overrides


def make_workdir(workdir: str) -> None:
  """Creates `workdir` if missing; a file there, or a folder we cannot write, is a UserError."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"{workdir}: --workdir must be a folder, this is a file")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"{workdir}: cannot create --workdir ({e.strerror or e})") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"{workdir}: --workdir is not writable")


def main(argv: Sequence[str], prog: str = "train.py") -> int:
  args, overrides = parse_args(argv, prog)
  config = load_config_file(args.config)
  if args.skip_bad:
    overrides.append("data.skip_bad=True")
  if overrides:
    config = apply_overrides(config, overrides)
  make_workdir(args.workdir)
  configure_logging()
  try:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                           args.local_devices)
  except UserError as e:
    raise UserError(f"{prog}: {e}") from None
  configure_jax()
  try:
    with hold_workdir(args.workdir):
      loop.train_and_evaluate(config, args.workdir)
  except KeyboardInterrupt:
    # Ctrl-C before the training loop took over the signal (data, compilation, restore),
    # or a second Ctrl-C inside it: no new checkpoint, the complete ones stay.
    print("stopped by Ctrl-C; no checkpoint saved now. Rerun the same command to resume "
          "from the newest one.", file=sys.stderr)
    return 130
  except loop.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return loop.EXIT_DIVERGED
  except loop.Interrupted as e:
    print(f"stopped by {e}; checkpoint saved at step {e.step}. "
          f"Rerun the same command to resume.", file=sys.stderr)
    return 128 + int(e.signum)
  return 0


entry = entry_point(lambda argv: main(argv, prog="munet-train"))
