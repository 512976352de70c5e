"""predict.py and eval.py killed (or stopped by Ctrl-C) while writing their outputs.

A fault is injected at the call that writes the file (`tests/reliability/inject.py`):
  before  SIGKILL just before nibabel / json writes it,
  half    SIGKILL once half of the file is on disk,
  after   SIGKILL when the writer has returned, before the rename into place.
No file may then exist under the final name unless it is complete (a file already there
keeps its old content), and the next run writes it and removes the killed run's hidden
temporary.
"""

import os

import nibabel as nib
import numpy as np
import pytest

import harness

pytestmark = pytest.mark.slow

NIB_SAVE = "munet_jax.data.nifti:nib.save"
JSON_DUMP = "munet_jax.atomic:json.dump"   # the results writer, atomic.write_json


def _labels(path):
  return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("action", ["before", "half", "after"])
def test_predict_killed_while_writing_leaves_the_old_file_or_none(
    tmp_path, reference_run, data_root, action):
  ct = os.path.join(data_root, "volume-0.nii.gz")
  out = tmp_path / "pred" / "volume-0.nii.gz"
  args = ("--workdir", reference_run[0], "--input", ct, "--output", out)
  killed = harness.run("predict", *args, fault=f"{NIB_SAVE}:1:{action}")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert harness.nifti_files(out.parent) == []
  left = harness.hidden_files(out.parent)
  assert len(left) == (0 if action == "before" else 1), left
  result = harness.run("predict", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(out.parent) == ["volume-0.nii.gz"]     # the temporary is gone too
  assert _labels(out).shape == nib.load(ct).shape


def test_predict_on_a_folder_killed_at_the_second_file_keeps_the_first_whole(
    tmp_path, reference_run, data_root):
  inputs = tmp_path / "ct"
  os.makedirs(inputs)
  for n in range(3):
    os.symlink(os.path.join(data_root, f"volume-{n}.nii.gz"), inputs / f"volume-{n}.nii.gz")
  out = tmp_path / "pred"
  os.makedirs(out)
  # An older result for volume-1 (say, from another checkpoint) is already there.
  old = np.full(nib.load(str(inputs / "volume-1.nii.gz")).shape, 2, np.uint8)
  nib.save(nib.Nifti1Image(old, np.eye(4)), str(out / "volume-1.nii.gz"))
  args = ("--workdir", reference_run[0], "--input", inputs, "--output", out)
  killed = harness.run("predict", *args, fault=f"{NIB_SAVE}:2:half")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert harness.nifti_files(out) == ["volume-0.nii.gz", "volume-1.nii.gz"]
  first = _labels(out / "volume-0.nii.gz")                  # complete: it reads back
  np.testing.assert_array_equal(_labels(out / "volume-1.nii.gz"), old)   # untouched
  result = harness.run("predict", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == [f"volume-{n}.nii.gz" for n in range(3)]
  np.testing.assert_array_equal(_labels(out / "volume-0.nii.gz"), first)
  assert not np.array_equal(_labels(out / "volume-1.nii.gz"), old)


def test_predict_stopped_by_ctrl_c_while_writing_is_130_and_leaves_nothing(
    tmp_path, reference_run, data_root):
  out = tmp_path / "pred" / "volume-0.nii.gz"
  result = harness.run("predict", "--workdir", reference_run[0], "--input",
                       os.path.join(data_root, "volume-0.nii.gz"), "--output", out,
                       fault=f"{NIB_SAVE}:1:sigint")
  assert result.returncode == 130, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert harness.stderr_lines(result.stderr) == [
      "stopped by Ctrl-C; the files already written are complete"]
  assert not out.parent.exists() or os.listdir(out.parent) == []


@pytest.fixture
def label_folders(tmp_path, data_root):
  """--pred and --ref folders: the synthetic reference labels, and predictions of them."""
  pred, ref = tmp_path / "pred", tmp_path / "ref"
  for folder in (pred, ref):
    os.makedirs(folder)
  for n in range(3):
    label = os.path.join(data_root, f"segmentation-{n}.nii.gz")
    os.symlink(label, ref / f"volume-{n}.nii.gz")
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[data == 2] = 1                         # a prediction that misses the tumour
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(pred / f"volume-{n}.nii.gz"))
  return pred, ref


@pytest.mark.parametrize("action", ["before", "after"])
def test_eval_pred_ref_killed_while_writing_keeps_the_previous_results(
    tmp_path, label_folders, action):
  pred, ref = label_folders
  out = tmp_path / "scores" / "results.json"
  os.makedirs(out.parent)
  out.write_text('{"previous": "results"}')
  args = ("--pred", pred, "--ref", ref, "--out", out)
  # 'after': json.dump has returned with part of the document still in the file's
  # buffer, so the temporary on disk is cut short, as in a kill mid-write.
  killed = harness.run("eval", *args, fault=f"{JSON_DUMP}:1:{action}")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert harness.read_json(out) == {"previous": "results"}
  result = harness.run("eval", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  document = harness.read_json(out)
  assert [c["case"] for c in document["cases"]] == ["volume-0", "volume-1", "volume-2"]
  assert os.listdir(out.parent) == ["results.json"]


def test_eval_workdir_killed_while_writing_then_stopped_by_ctrl_c(tmp_path, reference_run):
  out = tmp_path / "eval" / "results.json"
  args = ("--workdir", reference_run[0], "--split", "val", "--out", out)
  killed = harness.run("eval", *args, fault=f"{JSON_DUMP}:1:after")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not out.exists() and len(harness.hidden_files(out.parent)) == 1
  stopped = harness.run("eval", *args, fault=f"{JSON_DUMP}:1:sigint")
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  assert harness.stderr_lines(stopped.stderr) == ["stopped by Ctrl-C; no results written"]
  assert not out.exists()
