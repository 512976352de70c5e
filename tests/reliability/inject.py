"""Runs a command-line tool with one fault injected at a chosen call.

  python tests/reliability/inject.py SPEC train.py --config C --workdir W
  python tests/reliability/inject.py SPEC -m munet_jax.data.prepare ROOT

SPEC is `module:attribute:n:action`. On the n-th call of `module.attribute` (a function,
or `Class.method`) the process
  before   kills itself with SIGKILL before the call,
  after    kills itself with SIGKILL when the call has returned,
  half     lets the call write its file, cuts that file (the first argument naming an
           existing file) to half its size and kills itself with SIGKILL: a death in
           the middle of writing it,
  sigint   sends itself SIGINT before the call (Ctrl-C) and goes on,
  sigterm  sends itself SIGTERM before the call and goes on.

The tool then runs unchanged, as `__main__`, in this process: what happens after the
fault is the tool's own behaviour.
"""

import functools
import importlib
import os
import runpy
import signal
import sys

ACTIONS = ("before", "after", "half", "sigint", "sigterm")


def _target(spec: str):
  module_name, attribute, n, action = spec.split(":")
  if action not in ACTIONS:
    raise SystemExit(f"inject.py: action must be one of {ACTIONS}, got {action!r}")
  owner = importlib.import_module(module_name)
  *path, name = attribute.split(".")
  for part in path:
    owner = getattr(owner, part)
  return owner, name, int(n), action


def _file_argument(args, kwargs):
  for value in (*args, *kwargs.values()):
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
      return os.fspath(value)
  raise RuntimeError("inject.py: 'half' needs a call with a file argument")


def install(spec: str) -> None:
  owner, name, n, action = _target(spec)
  original = getattr(owner, name)
  calls = 0

  @functools.wraps(original)
  def faulty(*args, **kwargs):
    nonlocal calls
    calls += 1
    if calls != n:
      return original(*args, **kwargs)
    if action == "before":
      os.kill(os.getpid(), signal.SIGKILL)
    if action in ("sigint", "sigterm"):
      os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
      return original(*args, **kwargs)
    result = original(*args, **kwargs)
    if action == "half":
      path = _file_argument(args, kwargs)
      os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
    return result

  setattr(owner, name, faulty)


def main(argv):
  spec, *command = argv
  # The Ctrl-C this stands for comes from a terminal, where Python turns SIGINT into
  # KeyboardInterrupt. A suite started in the background (`cmd &` in a script) hands its
  # processes SIGINT ignored, and Python then leaves it ignored.
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, root)
  install(spec)
  if command[0] == "-m":
    sys.argv = [command[1], *command[2:]]
    runpy.run_module(command[1], run_name="__main__", alter_sys=True)
  else:
    script = os.path.join(root, command[0]) if not os.path.isabs(command[0]) else command[0]
    sys.argv = [script, *command[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main(sys.argv[1:])
