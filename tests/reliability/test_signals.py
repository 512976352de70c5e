"""SIGTERM and Ctrl-C (SIGINT) on train.py: a checkpoint first, then exit 143 / 130.

A scheduler pre-empting a job sends SIGTERM (SLURM: to every process of the job step, so
to the data workers too); Ctrl-C reaches the whole foreground process group. Either way
the run saves a checkpoint of the step it reached, says so in one line, exits with
128 + the signal number, and the same command resumes it to the same end as a run never
stopped.
"""

import os
import random
import re
import signal
import time

import pytest

import harness

pytestmark = pytest.mark.slow


def _stop_mid_training(config, workdir, signum, *extra, group=False, seed=0):
  """Starts training, sends `signum` at a seeded random moment after the first save."""
  proc = harness.start("train", "--config", config, "--workdir", workdir, *extra,
                       new_session=group)
  harness.wait_until(lambda: harness.complete_steps(workdir), proc, what="a checkpoint")
  time.sleep(random.Random(seed).uniform(0.0, 0.3))
  assert proc.poll() is None, "training ended before the signal"
  if group:
    os.killpg(proc.pid, signum)
  else:
    proc.send_signal(signum)
  return harness.finish(proc)


def _check_stopped(result, workdir, name):
  """Exit 128 + signal, one line naming the saved step, and that checkpoint complete."""
  signum = getattr(signal, name)
  assert result.returncode == 128 + signum, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in harness.stderr_lines(result.stderr) if l.startswith("stopped")]
  assert len(lines) == 1, result.stderr[-3000:]
  m = re.fullmatch(rf"stopped by {name} at step (\d+); checkpoint saved at step (\d+)\. "
                   r"Rerun the same command to resume\.", lines[0])
  assert m and m.group(1) == m.group(2), lines[0]
  step = int(m.group(2))
  assert harness.complete_steps(workdir)[-1] == step
  assert harness.temporary_saves(workdir) == []
  return step


def _resume_to_the_end(config, workdir, step, reference, *extra):
  result = harness.run("train", "--config", config, "--workdir", workdir, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  assert harness.resumed_from(result.stdout) == step
  harness.assert_same_state(workdir, reference)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_mid_training_saves_exits_128_plus_signal_and_resumes_bitwise(
    tmp_path, tiny_config, reference_run, name):
  workdir = str(tmp_path / "run")
  result = _stop_mid_training(tiny_config, workdir, getattr(signal, name), seed=len(name))
  step = _check_stopped(result, workdir, name)
  assert 0 < step < harness.STEPS
  _resume_to_the_end(tiny_config, workdir, step, reference_run[0])


def test_sigterm_to_the_whole_process_group_with_data_workers(
    tmp_path, tiny_config, reference_run):
  # SLURM's pre-emption signal reaches the Grain worker processes as well as the trainer.
  workers = "--config.data.num_workers=2"
  workdir = str(tmp_path / "run")
  result = _stop_mid_training(tiny_config, workdir, signal.SIGTERM, workers, group=True)
  step = _check_stopped(result, workdir, "SIGTERM")
  _resume_to_the_end(tiny_config, workdir, step, reference_run[0], workers)


def _group_members(pgid: int) -> list[int]:
  members = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[2]) == pgid and fields[0] != "Z":   # fields: state, ppid, pgrp
        members.append(int(entry))
  return members


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigkill_of_the_trainer_leaves_no_data_worker_running(
    tmp_path, tiny_config, reference_run):
  workers = "--config.data.num_workers=2"
  workdir = str(tmp_path / "run")
  proc = harness.start("train", "--config", tiny_config, "--workdir", workdir, workers,
                       new_session=True)
  harness.wait_until(lambda: harness.complete_steps(workdir), proc, what="a checkpoint")
  assert len(_group_members(proc.pid)) >= 3   # the trainer and its two workers
  proc.kill()
  proc.wait()
  # Not `communicate()` yet: orphaned workers would hold its pipes open for ever.
  deadline = time.monotonic() + 30
  while _group_members(proc.pid) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = _group_members(proc.pid)
  for pid in left:   # do not leak them into the rest of the session
    os.kill(pid, signal.SIGKILL)
  harness.finish(proc)
  assert left == [], "data workers outlived the killed trainer"
  step = harness.complete_steps(workdir)[-1]
  _resume_to_the_end(tiny_config, workdir, step, reference_run[0], workers)


def test_ctrl_c_before_training_starts_is_one_line_and_exit_130(tmp_path, tiny_config):
  # Ctrl-C while the run is still reading its checkpoints (nothing to save yet).
  result = harness.run("train", "--config", tiny_config, "--workdir", tmp_path / "run",
                       fault="munet_jax.checkpoints:Checkpointer.restore_latest:"
                             "1:sigint")
  assert result.returncode == 130, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr
  assert harness.stderr_lines(result.stderr) == [
      "stopped by Ctrl-C; no checkpoint saved now. Rerun the same command to resume "
      "from the newest one."]
