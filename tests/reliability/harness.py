"""Starting the real command-line tools and reading what they left on disk.

Every tool runs as its own process (`sys.executable train.py ...`), on the CPU, with a
JAX compilation cache shared by the processes of one test session: a restarted run then
skips XLA compilation, which is most of a tiny run's time. Only processes that are never
killed write to that cache (`write_cache=True`); a process killed mid-write could
otherwise leave a truncated entry behind. A cached program is the same program, so
results are bitwise those of a fresh compile (checked when this suite was written).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INJECT = os.path.join(ROOT, "tests", "reliability", "inject.py")
TOOLS = {"train": "train.py", "eval": "eval.py", "predict": "predict.py",
         "prepare": "-m munet_jax.data.prepare", "check": "-m munet_jax.data.check"}
TIMEOUT = 300
ORBAX_TMP = ".orbax-checkpoint-tmp"

# Set once per session by conftest.py.
JAX_CACHE: str | None = None

TINY_CONFIG = """
from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.root = {root!r}
  c.data.synthetic.cases = 3
  c.data.synthetic.size = 32
  c.data.synthetic.slices = 6
  c.data.image_size = 32
  c.data.split = "custom"
  c.data.num_train, c.data.num_val, c.data.num_test = 2, 1, 0
  c.data.num_workers = 0
  c.model.features = (4, 8)
  c.train.batch_size = 3
  c.train.steps = {steps}
  c.train.learning_rate = 1e-3
  c.train.log_every_steps = 2
  c.train.eval_every_steps = 8
  c.train.final_eval_split = "val"
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 2
  c.eval.batch_size = 8
  return c
"""
STEPS = 16


def write_config(folder, data_root, steps: int = STEPS, name: str = "config.py") -> str:
  """A config file for the tiny run: mU-Net widths (4, 8), 32x32 slices, batch 3."""
  path = os.path.join(str(folder), name)
  with open(path, "w") as f:
    f.write(TINY_CONFIG.format(root=str(data_root), steps=steps))
  return path


def env(write_cache: bool = False, **extra) -> dict:
  e = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)
  e.pop("MUNET_FAULT", None)
  if JAX_CACHE:
    e["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if not write_cache:   # reads the cache, never writes it
      e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = str(2 ** 62)
  return e


def command(tool: str, *args, fault: str | None = None) -> list[str]:
  """The command line of `tool` ('train', 'eval', 'predict', 'prepare', 'check')."""
  head = TOOLS[tool].split()
  if fault is not None:
    head = [INJECT, fault, *head]
  return [sys.executable, *head, *map(str, args)]


def start(tool: str, *args, fault: str | None = None, write_cache: bool = False,
          new_session: bool = False, **env_extra) -> subprocess.Popen:
  """Starts a tool; stdout and stderr are captured as text."""
  return subprocess.Popen(command(tool, *args, fault=fault), cwd=ROOT,
                          env=env(write_cache, **env_extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"{proc.args} ran over {timeout} s:\n{err[-3000:]}")
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(tool: str, *args, **kwargs) -> subprocess.CompletedProcess:
  timeout = kwargs.pop("timeout", TIMEOUT)
  return finish(start(tool, *args, **kwargs), timeout)


FORKED_TOOLS = os.path.join(ROOT, "tests", "reliability", "forked_tools.py")


def run_forked(cases, folder, timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
  """[(tool, args), ...] run as separate processes forked from one that imported the tools
  once (forked_tools.py): exit status, stdout and stderr of each, as `run` gives them."""
  cases_path, results_path = os.path.join(folder, "cases.json"), os.path.join(folder, "results.json")
  with open(cases_path, "w") as f:
    json.dump([[tool, [str(a) for a in args]] for tool, args in cases], f)
  done = finish(subprocess.Popen([sys.executable, FORKED_TOOLS, cases_path, results_path],
                                 cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True), timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(results_path) as f:
    return [subprocess.CompletedProcess([tool, *args], *result)
            for (tool, args), result in zip(cases, json.load(f))]


def kill(proc: subprocess.Popen, signum=signal.SIGKILL) -> subprocess.CompletedProcess:
  proc.send_signal(signum)
  return finish(proc)


def shared(tmp_path_factory, name, make):
  """`make(folder)` run once per test session, by all xdist workers, in a shared folder.

  The first worker to come makes it while the others wait on a file lock; a worker that
  failed half-way leaves it to be made again. Returns the folder.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent          # the session's folder above gw0, gw1, ...
  folder = base / f"reliability-{name}"
  with open(base / f"reliability-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = folder / ".done"
      if not done.exists():
        if folder.exists():      # a worker failed half-way: start again
          shutil.rmtree(folder)
        os.makedirs(folder)
        make(folder)
        done.write_text("")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return folder


# ------------------------------------------------------------------------- on disk


def checkpoint_dir(workdir) -> str:
  return os.path.join(str(workdir), "checkpoints")


def complete_steps(workdir) -> list[int]:
  """Steps whose checkpoint folder has been renamed into place (Orbax's commit)."""
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def temporary_saves(workdir) -> list[str]:
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder) if ORBAX_TMP in n)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120.0,
               interval: float = 0.002, what: str = "condition"):
  """Polls `predicate()` until it returns a true value; fails if `proc` ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"process ended (status {proc.returncode}) before {what}:\n"
                           f"{out[-1500:]}\n{err[-3000:]}")
    time.sleep(interval)
  raise AssertionError(f"no {what} after {timeout} s")


def resumed_from(stdout: str) -> int | None:
  m = re.search(r"resuming from checkpoint at step (\d+)", stdout)
  return int(m.group(1)) if m else None


def saved_state(workdir, step: int | None = None):
  """(step, leaves of the whole train state as numpy, data-iterator state) of a checkpoint.

  The whole `TrainState` -- parameters, batch statistics, both Adam moments, the step
  and the dropout key -- read back raw, without a target structure.
  """
  import jax
  import orbax.checkpoint as ocp
  from munet_jax.checkpoints import Checkpointer
  ckpt = Checkpointer(str(workdir), read_only=True)
  try:
    step = max(ckpt.steps()) if step is None else step
    _, state = ckpt.restore_for_inference(step)   # on this process's devices, any count
    data = ckpt.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  finally:
    ckpt.close()
  paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p), np.asarray(x))
            for p, x in paths_leaves]
  return step, leaves, data


def assert_same_state(workdir, reference_workdir) -> None:
  """The newest checkpoints of two runs hold bitwise the same train and data state."""
  step, leaves, data = saved_state(workdir)
  ref_step, ref_leaves, ref_data = saved_state(reference_workdir)
  assert step == ref_step, (step, ref_step)
  assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
  for (path, a), (_, b) in zip(leaves, ref_leaves):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    assert a.tobytes() == b.tobytes(), f"{path} differs from the uninterrupted run"
  assert data == ref_data


def stderr_lines(err: str) -> list[str]:
  """stderr without tqdm progress-bar output (carriage-return redraws and bar lines)."""
  lines = []
  for line in err.splitlines():
    line = line.split("\r")[-1].strip()
    if line and not re.match(r"^(train|evaluate|predict|preparing slice store|synthetic CT)"
                             r"(:| )", line):
      lines.append(line)
  return lines


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str,
                          lines: list[str] | None = None) -> str:
  """Exit status 2, exactly one stderr line 'error: ...' holding every needle, no traceback."""
  lines = result.stderr.strip().splitlines() if lines is None else lines
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def nifti_files(folder) -> list[str]:
  """Visible NIfTI files of a folder (what the tools and users see as outputs)."""
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder)
                if n.endswith((".nii", ".nii.gz")) and not n.startswith("."))


def read_json(path):
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------- damage


def copy_run(workdir, to) -> str:
  """A copy of a training run's folder (checkpoints, metrics, results) to damage."""
  shutil.copytree(str(workdir), str(to), symlinks=True)
  return str(to)


def damage_checkpoint(workdir, step: int, how: str) -> str:
  """Damages checkpoint `step` of a run; returns the damaged file's path.

  'truncated' cuts the largest array-data file of its train state to half: a file of
  `state/d/`, where Orbax merges the arrays when a save completes (`ocdbt.process_*/d`
  hold what it merged from, which a restore no longer reads; bench/checkpoint_damage.py
  damages every file in turn). 'deleted' removes the state's `_METADATA` (its tree).
  """
  state = os.path.join(checkpoint_dir(workdir), str(step), "state")
  if how == "truncated":
    data = os.path.join(state, "d")
    files = [os.path.join(data, f) for f in os.listdir(data)] if os.path.isdir(data) else []
    assert files, f"no merged array data in {state}"
    path = max(files, key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "deleted":
    path = os.path.join(state, "_METADATA")
    os.remove(path)
  else:
    raise ValueError(how)
  return path


def warnings(err: str) -> list[str]:
  return [line for line in stderr_lines(err) if line.startswith("WARNING")]


def hidden_files(folder) -> list[str]:
  """Hidden entries of a folder (where atomic writes keep their temporaries)."""
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder) if n.startswith("."))


# ------------------------------------------------------------------- small file systems


class SmallFileSystem:
  """A tmpfs of a chosen size mounted at a folder: a real full disk for the tools.

  Needs root with the right to mount (as in this project's containers); `mount` raises
  pytest's skip otherwise, naming why.
  """

  def __init__(self, folder, size: str):
    self.folder, self.size = str(folder), size

  def mount(self):
    import pytest
    os.makedirs(self.folder, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                           self.folder], capture_output=True, text=True)
    if done.returncode != 0:
      pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    return self

  def remount(self, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", self.folder], check=True)

  def fill(self, leave_bytes: int = 0) -> None:
    """Fills the file system with one file, leaving about `leave_bytes` free."""
    stat = os.statvfs(self.folder)
    free = stat.f_bavail * stat.f_frsize - leave_bytes
    with open(os.path.join(self.folder, "filler"), "wb") as f:
      f.truncate(0)
      if free > 0:
        f.write(b"\0" * free)

  def unmount(self) -> None:
    subprocess.run(["umount", "-l", self.folder], capture_output=True)

  def __enter__(self):
    return self.mount()

  def __exit__(self, *exc):
    self.unmount()
    return False



def assert_one_message(result, *needles: str) -> str:
  """`assert_one_error_line` for a tool that failed after its progress bars started."""
  return assert_one_error_line(result, *needles, lines=stderr_lines(result.stderr))
