"""munet_jax.data.discovery: both layouts of SPEC.md, found by file name."""

import os

import pytest

from munet_jax.data.discovery import Case, find_cases, natural_key
from munet_jax.errors import UserError


def _touch(root, *paths):
  for p in paths:
    full = os.path.join(root, p)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    open(full, "wb").close()


def test_lits_layout_in_sub_folders_is_paired_across_folders(tmp_path):
  _touch(tmp_path, "Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii",
         "Training Batch 2/volume-10.nii.gz", "Training Batch 2/segmentation-10.nii.gz",
         "volumes/volume-2.nii.gz", "labels/segmentation-2.nii.gz")
  cases = find_cases(tmp_path)
  assert [c.name for c in cases] == ["volume-0", "volume-2", "volume-10"]
  assert cases[1] == Case("volume-2", str(tmp_path / "volumes/volume-2.nii.gz"),
                          str(tmp_path / "labels/segmentation-2.nii.gz"))


def test_decathlon_layout_strips_the_0000_suffix(tmp_path):
  _touch(tmp_path, "Task03_Liver/imagesTr/liver_3_0000.nii.gz",
         "Task03_Liver/imagesTr/liver_12.nii.gz",
         "Task03_Liver/labelsTr/liver_3.nii.gz", "Task03_Liver/labelsTr/liver_12.nii.gz",
         "Task03_Liver/imagesTs/liver_200.nii.gz")
  cases = find_cases(tmp_path)
  assert [c.name for c in cases] == ["liver_3", "liver_12"]
  assert cases[0].image.endswith("imagesTr/liver_3_0000.nii.gz")
  assert cases[0].label.endswith("labelsTr/liver_3.nii.gz")


def test_hidden_files_and_the_cache_folder_are_ignored(tmp_path):
  _touch(tmp_path, "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz",
         "imagesTr/._liver_0.nii.gz", ".munet_cache/volume-1.nii.gz", "notes.txt")
  assert [c.name for c in find_cases(tmp_path)] == ["liver_0"]


def test_missing_label_is_allowed_for_prediction(tmp_path):
  _touch(tmp_path, "volume-1.nii.gz")
  assert find_cases(tmp_path, require_labels=False) == [
      Case("volume-1", str(tmp_path / "volume-1.nii.gz"), None)]


@pytest.mark.parametrize("files, needle", [
    (["volume-1.nii.gz"], "volume-1.nii.gz: image has no label"),
    (["segmentation-4.nii.gz"], "segmentation-4.nii.gz: label file has no matching image"),
    (["imagesTr/liver_1.nii.gz"], "image has no label file"),
    (["labelsTr/liver_1.nii.gz"], "label file has no matching image"),
    (["a/volume-1.nii.gz", "b/volume-1.nii.gz", "segmentation-1.nii.gz"], "duplicate image"),
    (["imagesTr/liver_1_0001.nii.gz"], "single-channel"),
    (["readme.txt"], "no CT volumes found"),
])
def test_layout_problems_name_the_file(tmp_path, files, needle):
  _touch(tmp_path, *files)
  with pytest.raises(UserError, match=needle):
    find_cases(tmp_path)


def test_missing_and_empty_folders_are_errors(tmp_path):
  with pytest.raises(UserError, match="data folder not found"):
    find_cases(tmp_path / "nope")
  with pytest.raises(UserError, match="no CT volumes found"):
    find_cases(tmp_path)
  _touch(tmp_path, "file.nii.gz")
  with pytest.raises(UserError, match="must be a folder"):
    find_cases(tmp_path / "file.nii.gz")


def test_natural_order():
  names = ["volume-10", "volume-2", "volume-1"]
  assert sorted(names, key=natural_key) == ["volume-1", "volume-2", "volume-10"]
