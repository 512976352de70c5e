"""The README's demo from nothing, timed: synthetic data, training, checkpoints, evaluation.

  python bench/demo_run.py [--out DIR]

Runs `python train.py --config configs/demo.py` as a new user would, in a fresh folder
(no data, no slice store, no checkpoints), and prints the wall time, the load average
before and after, and the held-out mean liver DSC from the run's results.json. The
demo's targets: at most 10 minutes on a 2-core CPU, mean liver DSC at least 0.90.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        text=True)
  seconds = time.perf_counter() - start
  print(proc.stdout)
  print(f"exit status {proc.returncode}; wall time {seconds / 60:.2f} min; load after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if proc.returncode == 0:
    with open(os.path.join(workdir, "eval", "results.json")) as f:
      summary = json.load(f)["summary"]["liver"]["dsc"]
    print(f"held-out mean liver DSC {summary['mean']:.4f} ± {summary['std']:.4f} "
          f"over {summary['n']} volumes")
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main())
