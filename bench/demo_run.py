"""The README's demo from nothing, timed: synthetic data, training, checkpoints, evaluation.

  python bench/demo_run.py [--out DIR]

Runs `python train.py --config configs/demo.py` as a new user would, in a fresh folder
(no data, no slice store, no checkpoints), and prints the wall time, the load average
(before, sampled every 15 s during the run, after), the table the run printed, and the
demo's figures against its targets: at most 10 minutes on a 2-core CPU, held-out mean
liver DSC at least 0.92, tumour global Dice at least 0.50, lesion recall at least 50 %
over all held-out lesions and at least 80 % over the large ones, lesion precision at
least 50 %.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINUTES = 10.0


def targets(document: dict) -> list[tuple[str, float | None, float]]:
  """(name, value, target) of the demo's figures, from its results document."""
  det = document["lesion_detection"]
  return [("mean liver DSC", document["summary"]["liver"]["dsc"]["mean"], 0.92),
          ("tumour global Dice", document["global_dice"]["tumor"], 0.50),
          ("lesion recall, all sizes", det["all"]["recall"], 0.50),
          ("lesion recall, large", det["large"]["recall"], 0.80),
          ("lesion precision, all sizes", det["all"]["precision"], 0.50)]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", help="folder for the data and the run (default: a new temporary one)")
  args = p.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="munet-demo-")
  data, workdir = os.path.join(out, "data"), os.path.join(out, "run")
  for path in (data, workdir):
    shutil.rmtree(path, ignore_errors=True)
  cmd = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", workdir,
         f"--config.data.root={data}"]
  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"device: {os.cpu_count()}-core CPU; load before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("command:", " ".join(cmd), flush=True)
  samples, done = [], threading.Event()

  def sample():
    while not done.wait(15.0):
      samples.append(os.getloadavg()[0])

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        text=True)
  seconds = time.perf_counter() - start
  done.set()
  print(proc.stdout)
  during = (f"{min(samples):.1f}-{max(samples):.1f}, mean {sum(samples) / len(samples):.1f}"
            if samples else "-")
  print(f"exit status {proc.returncode}; wall time {seconds / 60:.2f} min (target "
        f"{MINUTES:.0f}); load average (1 min) during the run {during}; after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if proc.returncode == 0:
    with open(os.path.join(workdir, "eval", "results.json")) as f:
      document = json.load(f)
    for name, value, target in targets(document):
      shown = "-" if value is None else f"{value:.4f}"
      met = value is not None and value >= target
      print(f"{name:30s} {shown:>8s}  target >= {target:.2f}  {'met' if met else 'NOT met'}")
    print(f"{'wall time':30s} {seconds / 60:8.2f}  target <= {MINUTES:.0f} min  "
          f"{'met' if seconds <= 60 * MINUTES else 'NOT met'}")
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main())
