"""train.py killed with SIGKILL at any moment, then started again, ends as if never killed.

Each restart must resume from the newest complete checkpoint on disk, and the run's last
checkpoint must hold bitwise the train state (parameters, batch statistics, Adam moments,
step, dropout key) and the data-iterator state of `reference_run`, the same config trained
without interruption. The kill moments are drawn from a seeded generator, so a failure
replays with the same delays (the machine's speed still moves what they land on).
"""

import json
import os
import random
import time

import pytest

import harness

pytestmark = pytest.mark.slow


def _restart_and_check_resume(config, workdir, **kwargs):
  """Starts the run again; checks it resumes from the newest complete checkpoint."""
  newest = (harness.complete_steps(workdir) or [None])[-1]
  proc = harness.start("train", "--config", config, "--workdir", workdir, **kwargs)
  return proc, newest


def _complete_run(config, workdir):
  proc, newest = _restart_and_check_resume(config, workdir)
  result = harness.finish(proc)
  assert result.returncode == 0, result.stderr[-3000:]
  assert harness.resumed_from(result.stdout) == newest, (newest, result.stdout[-2000:])
  assert "Traceback" not in result.stderr
  return result


def test_sigkill_at_seeded_random_moments_then_restart_ends_bitwise_equal(
    tmp_path, tiny_config, reference_run):
  rng = random.Random(20240611)
  workdir = str(tmp_path / "run")
  kills = []
  # First kill: any moment from the start (imports, data, compilation or training).
  proc, _ = _restart_and_check_resume(tiny_config, workdir)
  delay = rng.uniform(1.0, 6.0)
  time.sleep(delay)
  if proc.poll() is None:
    harness.kill(proc)
    kills.append(("from start", round(delay, 3), harness.complete_steps(workdir)))
  # Then three kills at random moments after the restarted run has saved something new.
  for _ in range(3):
    proc, newest = _restart_and_check_resume(tiny_config, workdir)
    harness.wait_until(lambda: (harness.complete_steps(workdir) or [-1])[-1] > (newest or 0),
                       proc, what="a new checkpoint")
    delay = rng.uniform(0.0, 0.6)
    time.sleep(delay)
    if proc.poll() is not None:
      break   # the run finished first: nothing left to interrupt
    result = harness.kill(proc)
    assert harness.resumed_from(result.stdout) == newest
    kills.append(("after a save", round(delay, 3), harness.complete_steps(workdir)))
  assert len(kills) >= 2, kills
  _complete_run(tiny_config, workdir)
  harness.assert_same_state(workdir, reference_run[0])
  assert harness.temporary_saves(workdir) == []


# Orbax commits a save by renames: each item's temporary folder (state, data, config,
# metrics: the order of the checkpoint manager's item handlers), then the step's. Five renames a save; the fault kills the run
# just before one of them, when everything before it is on disk.
RENAME = "orbax.checkpoint._src.path.async_path:rename"


@pytest.mark.parametrize("save, rename, what", [
    (2, 1, "the train state written, not yet renamed into the step"),
    (5, 5, "every item written, the step not yet renamed into place"),
])
def test_sigkill_during_an_async_checkpoint_save_resumes_from_the_previous_one(
    tmp_path, tiny_config, reference_run, save, rename, what):
  workdir = str(tmp_path / "run")
  step = 2 * save
  killed = harness.run("train", "--config", tiny_config, "--workdir", workdir,
                       fault=f"{RENAME}:{5 * (save - 1) + rename}:before")
  assert killed.returncode == -9, killed.stderr[-3000:]
  tmp_dir = os.path.join(harness.checkpoint_dir(workdir), f"{step}{harness.ORBAX_TMP}")
  assert os.path.isdir(os.path.join(tmp_dir, "state" if rename == 5 else
                                    f"state{harness.ORBAX_TMP}")), what
  assert step not in harness.complete_steps(workdir)
  assert harness.complete_steps(workdir)[-1] == step - 2
  _complete_run(tiny_config, workdir)
  harness.assert_same_state(workdir, reference_run[0])
  assert harness.temporary_saves(workdir) == []


def test_sigkill_while_the_final_results_are_written_then_restart_writes_them(
    tmp_path, tiny_config, reference_run):
  workdir = str(tmp_path / "run")
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir,
                       fault="munet_jax.atomic:json.dump:1:after")
  assert result.returncode == -9
  results = os.path.join(workdir, "eval", "results-val.json")   # the val split's name
  assert not os.path.exists(results)
  assert harness.complete_steps(workdir)[-1] == harness.STEPS
  final = _complete_run(tiny_config, workdir)
  assert "val split, 1 volumes" in final.stdout
  written, reference = (harness.read_json(path) for path in (
      results, os.path.join(reference_run[0], "eval", "results-val.json")))
  assert written["source"].pop("workdir") != reference["source"].pop("workdir")
  assert written == reference
  assert [n for n in os.listdir(os.path.dirname(results)) if n != "results-val.json"] == []


def test_a_metrics_row_cut_short_by_a_kill_does_not_swallow_the_next_row(
    tmp_path, tiny_config, reference_run):
  workdir = str(tmp_path / "run")
  proc = harness.start("train", "--config", tiny_config, "--workdir", workdir)
  harness.wait_until(lambda: 6 in harness.complete_steps(workdir), proc, what="checkpoint 6")
  harness.kill(proc)
  # What a kill right after the newest checkpoint, in the middle of appending the next
  # row, leaves: the rows up to that checkpoint and a line without its end. Every row
  # after it then comes from the restarted run.
  newest = harness.complete_steps(workdir)[-1]
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= newest]
  with open(path, "w") as f:
    f.writelines(rows)
    f.write('{"step": 99, "train/lo')
  _complete_run(tiny_config, workdir)
  from munet_jax.training.reporting import read_metrics
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  logged = {r["step"] for r in rows if "train/loss" in r}
  assert set(range(2, harness.STEPS + 1, 2)) <= logged
  assert 99 not in logged


@pytest.mark.parametrize("what, fault", [
    # After volume-1.nii.gz and segmentation-1.nii.gz: two whole cases of three on disk.
    ("synthetic data generation", "munet_jax.data.nifti:write_image:4:after"),
    # Half of the second volume's hu.npy written into the store's temporary folder.
    ("slice store preparation", "munet_jax.data.store:_write_slices:3:half"),
])
def test_sigkill_before_training_starts_then_restart_ends_bitwise_equal(
    tmp_path, reference_run, what, fault):
  # A data root that does not exist yet: train.py makes the synthetic data (seed 0, as
  # `data_root`) and prepares its slice store, and is killed in the middle.
  root = tmp_path / "data"
  config = harness.write_config(tmp_path, root)
  workdir = str(tmp_path / "run")
  killed = harness.run("train", "--config", config, "--workdir", workdir, fault=fault)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert harness.complete_steps(workdir) == []
  result = harness.run("train", "--config", config, "--workdir", workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  harness.assert_same_state(workdir, reference_run[0])


EMA = ("--config.train.ema_decay=0.9", "--config.train.ema_stats_steps=3")


def test_a_run_that_keeps_a_weight_average_resumes_bitwise_too(tmp_path, tiny_config):
  """The averaged weights and their batch-norm statistics are train state like the rest."""
  reference = str(tmp_path / "reference")
  done = harness.run("train", "--config", tiny_config, "--workdir", reference, *EMA)
  assert done.returncode == 0, done.stderr[-3000:]
  _, leaves, _ = harness.saved_state(reference)
  assert any(p.startswith("ema_params/") for p, _ in leaves)
  assert any(p.startswith("ema_batch_stats/") for p, _ in leaves)
  workdir = str(tmp_path / "run")
  # SIGKILL just before the fourth save (step 8): steps 7 and 8 fit the average's
  # batch norm, and the resumed run must fit it again the same way.
  killed = harness.run("train", "--config", tiny_config, "--workdir", workdir, *EMA,
                       fault="munet_jax.checkpoints:Checkpointer.save:4:before")
  assert killed.returncode == -9, killed.stderr[-3000:]
  newest = harness.complete_steps(workdir)[-1]
  assert 2 <= newest < 8, harness.complete_steps(workdir)
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir, *EMA)
  assert result.returncode == 0, result.stderr[-3000:]
  assert harness.resumed_from(result.stdout) == newest
  harness.assert_same_state(workdir, reference)
