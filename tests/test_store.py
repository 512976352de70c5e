"""The slice store: preparation, re-use, atomicity, bad cases, real CT."""

import json
import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import REAL_CT, needs_real_ct
from munet_jax.data import discovery, nifti, store, synthetic
from munet_jax.errors import UserError


def _case_files(root, n, hu, labels, affine):
  image = os.path.join(root, f"volume-{n}.nii.gz")
  label = os.path.join(root, f"segmentation-{n}.nii.gz")
  nifti.write_image(image, hu, affine)
  nifti.write_image(label, labels, affine)
  return discovery.Case(f"volume-{n}", image, label)


def _volume(shape=(6, 5, 4), seed=0):
  rng = np.random.default_rng(seed)
  hu = rng.integers(-1000, 1000, shape).astype(np.int16)
  labels = np.zeros(shape, np.uint8)
  labels[1:4, 1:4, 1:3] = 1
  labels[2, 2, 2] = 2
  return hu, labels


@pytest.fixture
def synthetic_root(tmp_path):
  root = str(tmp_path / "data")
  synthetic.write_dataset(root, 3, 32, seed=1, slices=8, progress=False)
  return root


def _entries(cache):
  with open(os.path.join(cache, "index.json")) as f:
    return json.load(f)["volumes"]


def test_store_holds_ras_slices_first_with_spacing_and_flags(synthetic_root, tmp_path):
  cases = discovery.find_cases(synthetic_root)
  s = store.prepare_store(cases, tmp_path / "cache")
  assert s.names == ["volume-0", "volume-1", "volume-2"] and s.skipped == []
  for case in cases:
    image, label = nifti.read_image(case.image), nifti.read_label(case.label)
    hu, lab = s.volume(case.name)
    want_hu = np.moveaxis(nifti.to_ras(image.data, image.affine), 2, 0)
    want_lab = np.moveaxis(nifti.to_ras(label.data, image.affine), 2, 0)
    assert hu.dtype == np.int16 and lab.dtype == np.uint8
    np.testing.assert_array_equal(hu, want_hu)
    np.testing.assert_array_equal(lab, want_lab)
    sx, sy, sz = nifti.ras_spacing(image.affine)
    np.testing.assert_allclose(s.info(case.name).spacing, (sz, sx, sy))
    flags = s.info(case.name).slice_flags()
    np.testing.assert_array_equal(flags & store.LIVER != 0, (want_lab > 0).any(axis=(1, 2)))
    np.testing.assert_array_equal(flags & store.TUMOUR != 0, (want_lab == 2).any(axis=(1, 2)))


def test_lps_volume_is_reoriented_to_ras(tmp_path):
  hu, labels = _volume()
  lps = np.diag([-0.7, -0.8, 2.5, 1.0])   # x runs to the left, y to the back
  case = _case_files(str(tmp_path / "d"), 0, hu, labels, lps)
  s = store.prepare_store([case], tmp_path / "cache")
  got_hu, got_lab = s.volume("volume-0")
  np.testing.assert_array_equal(got_hu, np.moveaxis(hu[::-1, ::-1, :], 2, 0))
  np.testing.assert_array_equal(got_lab, np.moveaxis(labels[::-1, ::-1, :], 2, 0))
  np.testing.assert_allclose(s.info("volume-0").spacing, (2.5, 0.7, 0.8))


def test_second_preparation_reads_no_nifti(synthetic_root, tmp_path, monkeypatch):
  cases = discovery.find_cases(synthetic_root)
  first = store.prepare_store(cases, tmp_path / "cache")

  def fail(*args, **kwargs):
    raise AssertionError("read a NIfTI file of an unchanged case")
  monkeypatch.setattr(nifti, "read_image", fail)
  monkeypatch.setattr(nifti, "read_label", fail)
  again = store.prepare_store(cases, tmp_path / "cache")
  assert [v.folder for v in again.volumes] == [v.folder for v in first.volumes]


def test_touched_source_is_prepared_again(synthetic_root, tmp_path, monkeypatch):
  cases = discovery.find_cases(synthetic_root)
  cache = str(tmp_path / "cache")
  first = store.prepare_store(cases, cache)
  old_folder = first.info("volume-1").folder
  hu, labels, affine = synthetic.make_case(np.random.default_rng(99), 32, 8)
  nifti.write_image(cases[1].image, hu, affine)
  nifti.write_image(cases[1].label, labels, affine)
  st = os.stat(cases[1].image)
  os.utime(cases[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime
  read = []
  real_read = nifti.read_image
  monkeypatch.setattr(nifti, "read_image", lambda p: read.append(p) or real_read(p))
  again = store.prepare_store(cases, cache)
  assert read == [cases[1].image]
  assert again.info("volume-1").folder != old_folder and not os.path.exists(old_folder)
  np.testing.assert_array_equal(again.volume("volume-1")[0],
                                np.moveaxis(nifti.to_ras(hu, affine), 2, 0))
  assert again.info("volume-0").folder == first.info("volume-0").folder


def _assert_no_entry(cache, name):
  index = os.path.join(cache, "index.json")
  if os.path.exists(index):
    assert name not in _entries(cache)
  volumes = os.path.join(cache, "volumes")
  left = os.listdir(volumes) if os.path.isdir(volumes) else []
  assert not [f for f in left if f.startswith(name + "-") or f.startswith(".tmp")], left
  with pytest.raises(UserError):
    store.open_store(cache, names=[name])


def test_failure_mid_preparation_leaves_no_complete_looking_entry(tmp_path, monkeypatch):
  root = str(tmp_path / "d")
  good = _case_files(root, 0, *_volume(seed=0), np.diag([1.0, 1.0, 2.0, 1.0]))
  doomed = _case_files(root, 1, *_volume(seed=1), np.diag([1.0, 1.0, 2.0, 1.0]))
  cache = str(tmp_path / "cache")
  real_write = store._write_slices

  def crash_on_labels(path, *args, **kwargs):   # hu.npy of volume-1 is written, then this
    if path.endswith("labels.npy"):
      with open(path, "wb") as f:
        f.write(b"half")
      raise KeyboardInterrupt
    return real_write(path, *args, **kwargs)
  store.prepare_store([good], cache)
  monkeypatch.setattr(store, "_write_slices", crash_on_labels)
  with pytest.raises(KeyboardInterrupt):
    store.prepare_store([good, doomed], cache)
  _assert_no_entry(cache, "volume-1")
  assert store.open_store(cache).names == ["volume-0"]   # what was complete is kept
  monkeypatch.setattr(store, "_write_slices", real_write)
  assert store.prepare_store([good, doomed], cache).names == ["volume-0", "volume-1"]


def test_folder_left_by_a_killed_preparation_is_ignored_and_removed(tmp_path):
  root = str(tmp_path / "d")
  case = _case_files(root, 0, *_volume(), np.diag([1.0, 1.0, 2.0, 1.0]))
  cache = str(tmp_path / "cache")
  killed = os.path.join(cache, "volumes", ".tmp-12345-abcd")
  os.makedirs(killed)
  np.save(os.path.join(killed, "hu.npy"), np.zeros((2, 2, 2), np.int16))
  s = store.prepare_store([case], cache)
  assert s.names == ["volume-0"] and not os.path.exists(killed)


def _label_value_3(root):
  hu, labels = _volume(seed=3)
  labels[0, 0, 0] = 3
  return _case_files(root, 1, hu, labels, np.diag([1.0, 1.0, 2.0, 1.0]))


def test_bad_case_raises_naming_the_file_and_is_not_stored(tmp_path):
  root = str(tmp_path / "d")
  good = _case_files(root, 0, *_volume(), np.diag([1.0, 1.0, 2.0, 1.0]))
  bad = _label_value_3(root)
  cache = str(tmp_path / "cache")
  with pytest.raises(UserError, match="segmentation-1.nii.gz: label values must be 0, 1 or 2"):
    store.prepare_store([good, bad], cache)
  _assert_no_entry(cache, "volume-1")


def test_skip_bad_leaves_the_case_out_and_remembers_it(tmp_path, monkeypatch):
  root = str(tmp_path / "d")
  good = _case_files(root, 0, *_volume(), np.diag([1.0, 1.0, 2.0, 1.0]))
  bad = _label_value_3(root)
  cache = str(tmp_path / "cache")
  s = store.prepare_store([good, bad], cache, skip_bad=True)
  assert s.names == ["volume-0"]
  [(name, reason)] = s.skipped
  assert name == "volume-1" and "segmentation-1.nii.gz" in reason and "\n" not in reason
  _assert_no_entry(cache, "volume-1")

  def fail(*args, **kwargs):
    raise AssertionError("re-read an unchanged bad case")
  monkeypatch.setattr(nifti, "read_image", fail)
  again = store.prepare_store([good, bad], cache, skip_bad=True)
  assert again.names == ["volume-0"] and again.skipped == s.skipped


@needs_real_ct
def test_real_ct_through_the_store(tmp_path):
  root = tmp_path / "real"
  root.mkdir()
  shutil.copy(os.path.join(REAL_CT, "ct_abdomen_3mm.nii.gz"), root / "volume-0.nii.gz")
  shutil.copy(os.path.join(REAL_CT, "liver_mask_a.nii.gz"), root / "segmentation-0.nii.gz")
  s = store.prepare_store(discovery.find_cases(str(root)), tmp_path / "cache")
  hu, labels = s.volume("volume-0")
  info = s.info("volume-0")
  assert info.shape == hu.shape == labels.shape == (30, 122, 101)
  np.testing.assert_allclose(info.spacing, (3.0, 3.0, 3.0), atol=1e-4)
  assert int((labels == 1).sum()) == 38634 and not (labels == 2).any()
  assert info.tumour == ()
  img = nib.load(os.path.join(REAL_CT, "ct_abdomen_3mm.nii.gz"))
  want = np.moveaxis(nifti.to_ras(np.asarray(img.dataobj), img.affine), 2, 0)
  np.testing.assert_array_equal(hu, want)
  liver_slices = np.flatnonzero((labels > 0).any(axis=(1, 2)))
  assert info.liver == ((int(liver_slices[0]), int(liver_slices[-1]) + 1),)


def test_open_store_selects_names_in_order(synthetic_root, tmp_path):
  cache = tmp_path / "cache"
  store.prepare_store(discovery.find_cases(synthetic_root), cache)
  s = store.open_store(cache, names=["volume-2", "volume-0"])
  assert s.names == ["volume-2", "volume-0"]
  assert s.num_slices == 16
  volume, z, flags = s.slice_table()
  np.testing.assert_array_equal(volume, np.repeat([0, 1], 8))
  np.testing.assert_array_equal(z, np.tile(np.arange(8), 2))
  with pytest.raises(UserError, match="volume-7"):
    store.open_store(cache, names=["volume-7"])


def test_open_store_without_a_store_names_the_folder(tmp_path):
  with pytest.raises(UserError, match="no prepared slice store"):
    store.open_store(tmp_path / "nothing")


def test_store_pickles_without_its_memory_maps(synthetic_root, tmp_path):
  s = store.prepare_store(discovery.find_cases(synthetic_root), tmp_path / "cache")
  hu, _ = s.volume("volume-0")
  assert isinstance(hu, np.memmap) and not hu.flags.writeable
  copy = pickle.loads(pickle.dumps(s))
  np.testing.assert_array_equal(copy.volume("volume-0")[0], hu)
