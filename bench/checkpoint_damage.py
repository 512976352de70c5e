#!/usr/bin/env python
"""Damages every file of one checkpoint's train state in turn and restores it.

  python bench/checkpoint_damage.py WORKDIR [--step N]

For each file under WORKDIR/checkpoints/N/state, on a fresh copy of the run: cut it to
half its size, or delete it, then restore the whole train state (no target) and compare
it bitwise with the intact checkpoint. Prints one table row per file and damage:
'fails' (Orbax raises: the tools then fall back to an older checkpoint), 'restores,
same' (the file is not read on restore), or 'restores, DIFFERENT' (silent corruption:
must never happen). Exit status 1 if any row is DIFFERENT.

Used for the checkpoint rows of bench/RESULTS.md, on the run the reliability suite
trains (tests/reliability, `reference_run`).
"""

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _state(workdir, step):
  """The train state's leaves, as (path, numpy array), read back raw."""
  import jax
  import orbax.checkpoint as ocp
  from munet_jax.checkpoints import Checkpointer
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  finally:
    ckpt.close()
  leaves = jax.tree_util.tree_flatten_with_path(restored.state)[0]
  return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves]


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--step", type=int, help="default: the newest checkpoint")
  args = parser.parse_args(argv)
  import logging
  logging.disable(logging.CRITICAL)
  from munet_jax import _orbax_quiet
  from munet_jax.checkpoints import Checkpointer
  _orbax_quiet.drop_late_restore_errors()   # the failed restores' late tracebacks: not table rows
  ckpt = Checkpointer(args.workdir, read_only=True)
  step = args.step if args.step is not None else max(ckpt.steps())
  ckpt.close()
  intact = _state(args.workdir, step)
  state = os.path.join(args.workdir, "checkpoints", str(step), "state")
  files = sorted(os.path.relpath(os.path.join(folder, f), state)
                 for folder, _, names in os.walk(state) for f in names)
  print(f"| file of checkpoints/{step}/state | bytes | cut to half | deleted |")
  print("| --- | ---: | --- | --- |")
  different = False
  with tempfile.TemporaryDirectory() as tmp:
    for rel in files:
      cells = []
      for how in ("truncate", "delete"):
        copy = os.path.join(tmp, "run")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(os.path.join(args.workdir, "checkpoints"),
                        os.path.join(copy, "checkpoints"))
        path = os.path.join(copy, "checkpoints", str(step), "state", rel)
        size = os.path.getsize(path)
        if how == "truncate":
          os.truncate(path, size // 2)
        else:
          os.remove(path)
        try:
          leaves = _state(copy, step)
        except Exception as e:  # what a damaged checkpoint should do
          cells.append(f"fails ({type(e).__name__})")
          continue
        same = len(leaves) == len(intact) and all(
            p == q and a.dtype == b.dtype and a.tobytes() == b.tobytes()
            for (p, a), (q, b) in zip(leaves, intact))
        different |= not same
        cells.append("restores, same" if same else "restores, DIFFERENT")
      print(f"| `{rel}` | {size} | {cells[0]} | {cells[1]} |", flush=True)
  return 1 if different else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
