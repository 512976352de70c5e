"""`train.py`: flags in, `train_and_evaluate` out, with the exit statuses users script on.

Exit status: 0 done; 2 a user error (one line on stderr); 3 the loss stopped being
finite (the last good checkpoint is kept); 130 / 143 stopped by Ctrl-C / SIGTERM after
saving a checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

from munet_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"train.py: {message}")


def parse_args(argv: Sequence[str]):
  parser = _Parser(prog="train.py", description="Train mU-Net on a CT data set.")
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
      raise UserError(f"train.py: unrecognised argument '{item}'")
    overrides.append(item[len("--config."):])
  return args, overrides


def initialize_distributed(args) -> None:
  """Starts JAX's multi-process runtime: from flags, or from SLURM / TPU when they set it."""
  import jax
  explicit = args.coordinator is not None or args.num_processes is not None
  if explicit:
    if args.coordinator is None or args.num_processes is None or args.process_id is None:
      raise UserError("train.py: --coordinator, --num-processes and --process-id go together")
    local = None
    if args.local_devices:
      local = [int(d) for d in args.local_devices.split(",")]
    # CPU processes need a collectives library of their own (GPUs and TPUs ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               local_device_ids=local)
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()


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


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """The workdir's trainer lock for the whole run, taken before anything is written.

  Process 0 takes it for all processes of a multi-host run; the others learn from it
  whether they may go on, so a refused run stops on every process with exit status 2.
  """
  import jax
  import numpy as np
  from munet_jax.training.lock import WorkdirLock
  lock = WorkdirLock(workdir)
  refusal = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except UserError as e:
      refusal = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    held = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
    if not int(held) and refusal is None:
      refusal = UserError(f"{os.path.abspath(workdir)}: process 0 of this run could not take "
                          "the workdir's trainer lock (its message says why)")
  if refusal is not None:
    raise refusal
  try:
    yield lock
  finally:
    lock.release()


def main(argv: Sequence[str]) -> int:
  from munet_jax.config import apply_overrides, load_config_file
  args, overrides = parse_args(argv)
  config = load_config_file(args.config)
  if args.skip_bad:
    overrides.append("data.skip_bad=True")
  if overrides:
    config = apply_overrides(config, overrides)
  make_workdir(args.workdir)
  from munet_jax.runtime import configure_logging
  configure_logging()
  initialize_distributed(args)
  from munet_jax.runtime import configure_jax
  configure_jax()
  from munet_jax.training import loop
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
