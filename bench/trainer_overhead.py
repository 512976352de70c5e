"""The trainer's end-to-end rate against the bare training step, on the demo's config.

  python bench/trainer_overhead.py                      # configs/demo.py, 3 rounds
  python bench/trainer_overhead.py --workers 0,1,2 --steps 120

Each round runs, in this one process and in turn: the bare jitted step on a fixed batch
(as bench/train_speed.py times it), then `train_and_evaluate` for `--steps` steps for
each worker count (data pipeline, host loop, logging, one checkpoint at the end, no
validation or final evaluation). The trainer's rate is that of its own logged
slices/s rows after the first (which holds compilation), so both exclude compiling.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from munet_jax.config import load_config_file  # noqa: E402
from munet_jax.runtime import configure_jax, configure_logging  # noqa: E402
from munet_jax.training.loop import prepare_data, train_and_evaluate  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bare_rate(config, steps):
  size, batch = config.data.image_size, config.train.batch_size
  rng = np.random.default_rng(0)
  data = jax.device_put(dict(
      image=rng.integers(-1000, 1000, (batch, size, size, 1)).astype(np.int16),
      label=rng.integers(0, 3, (batch, size, size)).astype(np.int32),
      mask=np.ones(batch, bool)))
  state = create_train_state(config, jax.random.key(0))
  step = jax.jit(make_train_step(config), donate_argnums=0)
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  return steps * batch / (time.perf_counter() - t0)


def trainer_rate(config, workers, steps, scratch):
  c = config.copy_and_resolve_references()
  c.data.num_workers = workers
  c.train.steps = steps
  c.train.eval_every_steps = 10 ** 9
  c.train.final_eval_split = ""
  c.checkpoint.every_steps = 10 ** 9
  workdir = tempfile.mkdtemp(dir=scratch)
  train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rates = [r["train/slices_per_second"] for r in rows if "train/slices_per_second" in r][1:]
  shutil.rmtree(workdir)
  return statistics.median(rates)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  configure_jax()
  configure_logging()
  os.chdir(ROOT)   # the demo's data root is relative
  config = load_config_file(args.config)
  prepare_data(config)   # synthetic data and slice store, once
  workers = [int(w) for w in args.workers.split(",")]
  scratch = tempfile.mkdtemp()
  os.environ["TQDM_DISABLE"] = "1"
  bare, trained = [], {w: [] for w in workers}
  for _ in range(args.rounds):
    bare.append(bare_rate(config, args.steps))
    for w in workers:
      trained[w].append(trainer_rate(config, w, args.steps, scratch))
  print(f"# {args.config}: {args.steps} steps per run, {args.rounds} alternating rounds, "
        f"load {os.getloadavg()[0]:.2f} at the end")
  print("| run | slices/s (median) | per round | trainer / bare step (median of rounds) |")
  print("| --- | --- | --- | --- |")
  print(f"| bare step | {statistics.median(bare):.2f} | "
        f"{', '.join(f'{r:.1f}' for r in bare)} | 1 |")
  for w in workers:
    ratios = [t / b for t, b in zip(trained[w], bare)]
    print(f"| trainer, data.num_workers={w} | {statistics.median(trained[w]):.2f} | "
          f"{', '.join(f'{r:.1f}' for r in trained[w])} | {statistics.median(ratios):.2f} |")
  shutil.rmtree(scratch)


if __name__ == "__main__":
  main()
