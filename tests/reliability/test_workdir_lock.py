"""One trainer per workdir: a second is refused in one line; a dead one's lock stops nobody."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import harness
from munet_jax.errors import UserError
from munet_jax.training import lock as workdir_lock

HOLD = """
import sys, time
from munet_jax.training.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          text=True, env=harness.env(), cwd=harness.ROOT)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_lock_names_the_holder_and_a_dead_holder_frees_it(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(UserError) as refused:
      workdir_lock.WorkdirLock(tmp_path).acquire()
    message = str(refused.value)
    assert str(tmp_path) in message
    assert f"host {socket.gethostname()}, pid {holder.pid}" in message
  finally:
    holder.kill()
    holder.wait()
  with workdir_lock.WorkdirLock(tmp_path):   # SIGKILLed: the kernel dropped its lock
    record = json.loads(open(tmp_path / workdir_lock.LOCK_NAME).read())
    assert record["pid"] == os.getpid()


def test_without_file_locks_a_record_is_held_while_its_holder_lives(tmp_path):
  here = dict(host=socket.gethostname(), boot=workdir_lock._boot_id())
  now = time.time()
  assert workdir_lock._alive(dict(here, pid=os.getpid()), now)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True)
  assert not workdir_lock._alive(dict(here, pid=int(dead.stdout)), now)
  elsewhere = dict(host="another-node", boot="x", pid=1)
  assert workdir_lock._alive(elsewhere, now - 1)                        # heartbeat fresh
  assert not workdir_lock._alive(elsewhere, now - workdir_lock.STALE_SECONDS - 1)


@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_exits_2_before_touching_it(
    tmp_path, tiny_config, reference_run):
  workdir = tmp_path / "run"
  first = harness.start("train", "--config", tiny_config, "--workdir", workdir)
  harness.wait_until(lambda: harness.complete_steps(workdir), first, what="a checkpoint")
  # Paused, the first trainer is still running (and holds the lock) however long the
  # second takes to start on a loaded machine.
  os.kill(first.pid, signal.SIGSTOP)
  try:
    before = sorted(os.listdir(workdir)), open(workdir / "metrics.jsonl").read()
    second = harness.run("train", "--config", tiny_config, "--workdir", workdir)
    after = sorted(os.listdir(workdir)), open(workdir / "metrics.jsonl").read()
  finally:
    os.kill(first.pid, signal.SIGCONT)
  line = harness.assert_one_error_line(second, str(workdir), f"pid {first.pid}",
                                       "another trainer")
  assert second.stdout == "", second.stdout
  assert after == before   # the refused trainer wrote nothing
  first_done = harness.finish(first)
  assert first_done.returncode == 0, first_done.stderr[-3000:]
  rows = [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")
          if "train/loss" in json.loads(l)]
  assert rows == sorted(set(rows)), rows
  harness.assert_same_state(workdir, reference_run[0])
  assert "host" in line


@pytest.mark.slow
def test_a_sigkilled_trainer_leaves_a_lock_file_that_does_not_stop_the_rerun(
    tmp_path, tiny_config, reference_run):
  workdir = tmp_path / "run"
  first = harness.start("train", "--config", tiny_config, "--workdir", workdir)
  harness.wait_until(lambda: harness.complete_steps(workdir), first, what="a checkpoint")
  harness.kill(first, signal.SIGKILL)
  assert json.loads(open(workdir / workdir_lock.LOCK_NAME).read())["pid"] == first.pid
  rerun = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert harness.resumed_from(rerun.stdout) is not None
  harness.assert_same_state(workdir, reference_run[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_the_processes_of_one_multi_host_run_are_one_trainer(tmp_path, tiny_config):
  workdir = tmp_path / "run"
  coordinator = f"localhost:{_free_port()}"
  procs = [harness.start("train", "--config", tiny_config, "--workdir", workdir,
                         "--config.train.steps=4", "--coordinator", coordinator,
                         "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
  harness.wait_until(lambda: os.path.exists(workdir / workdir_lock.LOCK_NAME)
                     and os.path.getsize(workdir / workdir_lock.LOCK_NAME), procs[0],
                     what="the lock")
  other = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  running = procs[0].poll() is None
  done = [harness.finish(p) for p in procs]
  for d in done:
    assert d.returncode == 0, d.stderr[-3000:]
  if running:
    harness.assert_one_error_line(other, str(workdir), f"pid {procs[0].pid}")
  assert harness.complete_steps(workdir)[-1] == 4
