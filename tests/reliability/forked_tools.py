"""Runs many short tool invocations, each in its own process, paying the imports once.

  python forked_tools.py CASES.json RESULTS.json

CASES.json: [[tool, [arg, ...]], ...] with tools as in harness.TOOLS. This process
imports the tools' modules (JAX, Flax, Orbax: most of a bad-input run's seconds) and
then forks one child per case, two at a time. A child is a whole process of its own:
it runs the tool's `main` exactly as `train.py ...` would (through `munet_jax.cli.run`),
its stdout and stderr go to files, and its exit status is the tool's. RESULTS.json:
[[returncode, stdout, stderr], ...] in the order of the cases.

Forking is safe here because nothing in this process has started JAX's backends (their
threads are what make a fork after JAX unsafe); `_no_backend_started` checks that.
"""

import json
import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from munet_jax.cli import run  # noqa: E402
from munet_jax.cli import check, evaluate, predict, prepare, train  # noqa: E402

# tool -> (main, prog): the prog each command line shows in its messages.
MAINS = {"train": (train.main, "train.py"), "eval": (evaluate.main, "eval.py"),
         "predict": (predict.main, "predict.py"), "prepare": (prepare.main, "munet-prepare"),
         "check": (check.main, "munet-check")}
PARALLEL = 2


def _no_backend_started():
  from jax._src import xla_bridge
  assert not xla_bridge._backends, "a JAX backend was started before forking"
  assert threading.active_count() == 1, f"threads before forking: {threading.enumerate()}"


def _child(tool, args, out, err):
  os.dup2(out, 1)
  os.dup2(err, 2)
  main, prog = MAINS[tool]
  sys.argv = [prog, *args]
  code = 1
  try:
    code = run(lambda argv: main(argv, prog), args)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  except BaseException:   # what an uncaught exception does to a real process
    import traceback
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(cases_path, results_path):
  cases = json.load(open(cases_path))
  _no_backend_started()
  folder = tempfile.mkdtemp(prefix="forked-tools-")
  results = [None] * len(cases)
  running = {}

  def reap():
    pid, status = os.wait()
    i, files = running.pop(pid)
    texts = []
    for f in files:
      os.close(f[0])
      texts.append(open(f[1], errors="replace").read())
    results[i] = [os.waitstatus_to_exitcode(status), *texts]

  for i, (tool, args) in enumerate(cases):
    while len(running) >= PARALLEL:
      reap()
    files = [tempfile.mkstemp(dir=folder) for _ in range(2)]
    pid = os.fork()
    if pid == 0:
      _child(tool, args, files[0][0], files[1][0])
    running[pid] = (i, files)
  while running:
    reap()
  json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
  main(*sys.argv[1:])
