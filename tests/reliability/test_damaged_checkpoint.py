"""A damaged newest checkpoint: train.py, eval.py and predict.py fall back to the previous one.

Each test copies `reference_run` (the tiny run trained to the end), damages a checkpoint
the way a failing disk or a careless `rm` does -- the largest array-data file of its
train state cut to half, or the state's `_METADATA` deleted -- and runs the real tool
on it. With an older complete checkpoint
left, the tool warns in one line naming the damaged one and goes on from the older one;
with none left, it exits 2 with one line naming the checkpoints folder.
"""

import os
import sys

import nibabel as nib
import numpy as np
import pytest

import harness


DAMAGE = ["truncated", "deleted"]


def _damaged_copy(tmp_path, reference_run, how, every=False):
  """(workdir, newest step, previous step) of a copy of the reference run, damaged."""
  workdir = harness.copy_run(reference_run[0], tmp_path / "run")
  steps = harness.complete_steps(workdir)
  assert len(steps) >= 2, steps
  for step in (steps if every else steps[-1:]):
    harness.damage_checkpoint(workdir, step, how)
  return workdir, steps[-1], steps[-2]


def _one_warning(result, newest, then):
  [warning] = harness.warnings(result.stderr)
  assert f"checkpoints/{newest} is damaged" in warning, warning
  assert warning.endswith(then), warning
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return warning


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE)
def test_train_resumes_from_the_previous_checkpoint_and_ends_bitwise_equal(
    tmp_path, tiny_config, reference_run, how):
  workdir, newest, previous = _damaged_copy(tmp_path, reference_run, how)
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  _one_warning(result, newest, f"setting it aside as {newest}.damaged and resuming from "
                               f"step {previous}")
  assert harness.resumed_from(result.stdout) == previous
  # Kept for a look, out of the way of the resumed run, which saved `newest` again.
  assert os.path.isdir(os.path.join(harness.checkpoint_dir(workdir), f"{newest}.damaged"))
  assert harness.complete_steps(workdir)[-1] == newest
  harness.assert_same_state(workdir, reference_run[0])


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE)
def test_eval_scores_with_the_previous_checkpoint(tmp_path, reference_run, how):
  workdir, newest, previous = _damaged_copy(tmp_path, reference_run, how)
  out = tmp_path / "results.json"
  result = harness.run("eval", "--workdir", workdir, "--split", "val", "--out", out)
  assert result.returncode == 0, result.stderr[-3000:]
  _one_warning(result, newest, f"using step {previous}")
  document = harness.read_json(out)
  assert document["source"]["checkpoint_step"] == previous
  assert f"checkpoint step {previous} (latest)" in result.stdout
  assert len(document["cases"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE)
def test_predict_segments_with_the_previous_checkpoint(tmp_path, reference_run, data_root, how):
  workdir, newest, previous = _damaged_copy(tmp_path, reference_run, how)
  ct = os.path.join(data_root, "volume-0.nii.gz")
  out = tmp_path / "pred" / "volume-0.nii.gz"
  result = harness.run("predict", "--workdir", workdir, "--input", ct, "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  _one_warning(result, newest, f"using step {previous}")
  labels = nib.load(str(out))
  assert labels.shape == nib.load(ct).shape and labels.get_data_dtype() == np.uint8
  assert os.listdir(out.parent) == ["volume-0.nii.gz"]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train", "eval", "predict"])
def test_every_checkpoint_damaged_is_exit_2_and_one_line(
    tmp_path, tiny_config, reference_run, data_root, tool):
  how = DAMAGE[len(tool) % 2]
  workdir, _, _ = _damaged_copy(tmp_path, reference_run, how, every=True)
  before = sorted(os.listdir(harness.checkpoint_dir(workdir)))
  out = tmp_path / "out"
  args = {"train": ["--config", tiny_config],
          "eval": ["--split", "val", "--out", out / "results.json"],
          "predict": ["--input", os.path.join(data_root, "volume-0.nii.gz"),
                      "--output", out / "volume-0.nii.gz"]}[tool]
  result = harness.run(tool, "--workdir", workdir, *args)
  harness.assert_one_error_line(result, harness.checkpoint_dir(workdir),
                                "every checkpoint is damaged")
  assert sorted(os.listdir(harness.checkpoint_dir(workdir))) == before   # nothing moved
  assert not out.exists()


def test_late_reports_of_a_failed_restore_are_dropped_and_nothing_else(monkeypatch):
  # What TensorStore and Orbax leave after a failed restore, at random later moments.
  import logging
  import types
  import warnings
  from munet_jax import _orbax_quiet
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  monkeypatch.setattr(_orbax_quiet, "_restore_failed", False)
  monkeypatch.setattr(_orbax_quiet, "_filters_installed", False)
  asyncio_log = logging.getLogger("asyncio")
  level = asyncio_log.level
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter("always")
    try:
      _orbax_quiet.drop_late_restore_errors()
      _orbax_quiet.drop_late_restore_errors()     # installed once, not stacked
      assert asyncio_log.getEffectiveLevel() == logging.CRITICAL
    finally:
      asyncio_log.setLevel(level)
    warnings.warn("coroutine '_read_array_index_and_device_put' was never awaited",
                  RuntimeWarning)
    warnings.warn("coroutine 'mine' was never awaited", RuntimeWarning)
  assert [str(w.message) for w in warned] == ["coroutine 'mine' was never awaited"]
  namespace = {}
  exec(compile("async def read(): pass", os.path.join("site-packages", "orbax", "io.py"),
               "exec"), namespace)
  orbax_read = namespace["read"]()
  for error, source in [(RuntimeError("Event loop is closed"), None),
                        (ValueError("OUT_OF_RANGE"), orbax_read),
                        (RuntimeError("something else"), None),
                        (ValueError("OUT_OF_RANGE elsewhere"), object())]:
    sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=source))
  orbax_read.close()
  assert seen == ["something else", "OUT_OF_RANGE elsewhere"]
