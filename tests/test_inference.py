"""Volume inference: shapes, batching, device placement, post-processing, predict.py's paths."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import munet_jax
from munet_jax import inference
from munet_jax.data.volumes import prefetch
from munet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  from munet_jax.config import base_config
  c = base_config()
  c.model.features = (4, 8)
  c.eval.batch_size = 4
  return c, munet_jax.init(jax.random.key(3), c)


def _hu(shape, seed=0):
  return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


def _slice_by_slice(variables, config, hu):
  """The reference answer: each slice alone through munet_jax.apply."""
  out = np.empty(hu.shape, np.uint8)
  for k in range(hu.shape[2]):
    images = munet_jax.preprocess(hu[None, :, :, k, None].astype(np.float32), config)
    out[:, :, k] = np.argmax(np.asarray(munet_jax.apply(variables, images, config)), -1)
  return out


@pytest.mark.parametrize("depth", [1, 3, 4, 9])  # fewer, as many as, and more than a batch
def test_segmenter_matches_slice_by_slice_prediction(model, depth):
  config, variables = model
  hu = _hu((20, 13, depth))
  labels = inference.VolumeSegmenter(variables, config)(hu)
  assert labels.shape == hu.shape and labels.dtype == np.uint8
  expected = _slice_by_slice(variables, config, hu)
  assert len(np.unique(expected)) > 1          # a check that can fail
  assert np.mean(labels == expected) > 0.999   # argmax ties aside, the same labels


def test_float_and_integer_hounsfield_units_give_the_same_labels(model):
  config, variables = model
  hu = _hu((16, 16, 5))
  a = inference.VolumeSegmenter(variables, config)(hu)
  b = inference.VolumeSegmenter(variables, config)(hu.astype(np.float32))
  np.testing.assert_array_equal(a, b)


def test_volumes_of_one_slice_shape_compile_once(model):
  config, variables = model
  segmenter = inference.VolumeSegmenter(variables, config, batch_size=4)
  before = segmenter._label._cache_size()
  for depth in (2, 5, 11):
    segmenter(_hu((24, 8, depth), seed=depth))
  assert segmenter._label._cache_size() == before + 1
  # A new segmenter for the same model (another eval setting) reuses the program too.
  from munet_jax.config import config_from_dict
  other = config_from_dict(dict(config.to_dict(), eval=dict(config.eval.to_dict(),
                                                            small_lesion_mm=10.0)))
  inference.VolumeSegmenter(variables, other, batch_size=4)(_hu((24, 8, 3)))
  assert segmenter._label._cache_size() == before + 1


@pytest.mark.parametrize("batch,devices,padded", [(3, 1, 3), (3, 2, 4), (4, 2, 4), (5, 8, 8),
                                                  (9, 8, 16), (16, 3, 18)])
def test_batch_size_is_padded_to_the_device_count(model, batch, devices, padded):
  from munet_jax import sharding
  assert sharding.padded_batch_size(batch, devices) == padded
  config, variables = model   # and the segmenter takes its batch from there
  segmenter = inference.VolumeSegmenter(variables, config, batch_size=batch)
  assert segmenter.batch_size == sharding.padded_batch_size(batch, len(jax.local_devices()))


def test_segmenter_rejects_a_2d_array(model):
  config, variables = model
  with pytest.raises(ValueError, match="3-D"):
    inference.VolumeSegmenter(variables, config)(np.zeros((8, 8), np.int16))


@pytest.mark.slow
def test_sharding_over_three_devices_gives_the_same_labels(tmp_path, model):
  config, variables = model
  hu = _hu((16, 12, 7))
  one = inference.VolumeSegmenter(variables, config)(hu)
  script = f"""
import sys; sys.path.insert(0, {ROOT!r})
import jax, numpy as np, munet_jax
from munet_jax.runtime import configure_jax; configure_jax()
from munet_jax.config import base_config
from munet_jax import inference
from munet_jax.data.volumes import prefetch
assert len(jax.devices()) == 3
c = base_config(); c.model.features = (4, 8); c.eval.batch_size = 4
v = munet_jax.init(jax.random.key(3), c)
hu = np.random.default_rng(0).integers(-1000, 1000, (16, 12, 7)).astype(np.int16)
s = inference.VolumeSegmenter(v, c)
assert s.batch_size == 6
np.save({str(tmp_path / 'three.npy')!r}, s(hu))
"""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                   "--xla_force_host_platform_device_count=3")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  three = np.load(tmp_path / "three.npy")
  assert np.mean(three == one) > 0.999


# ----------------------------------------------------------------------- post-processing


def _config(**flags):
  from munet_jax.config import base_config
  c = base_config()
  for k, v in flags.items():
    c.eval[k] = v
  return c


def test_postprocess_is_off_by_default():
  labels = np.zeros((4, 4, 4), np.uint8)
  labels[0, 0, 0] = 2
  assert inference.postprocess(labels, _config()) is labels


def test_largest_liver_component_removes_the_others():
  labels = np.zeros((20, 20, 5), np.uint8)
  labels[0:10, 0:10, :] = 1
  labels[2:4, 2:4, 1:3] = 2          # tumour inside the big component: kept
  labels[15:17, 15:17, 0:2] = 1      # a stray liver island
  labels[18, 0, 4] = 2               # a stray tumour voxel
  out = inference.postprocess(labels, _config(largest_liver_component=True))
  expected = labels.copy()
  expected[15:17, 15:17, 0:2] = 0
  expected[18, 0, 4] = 0
  np.testing.assert_array_equal(out, expected)


def test_tumour_inside_liver_drops_tumours_touching_no_liver():
  labels = np.zeros((20, 20, 5), np.uint8)
  labels[0:10, 0:10, :] = 1
  labels[9:12, 0:3, 0:2] = 2         # touches the liver at x = 9: kept
  labels[15:18, 15:18, 2:4] = 2      # floats alone: dropped
  out = inference.postprocess(labels, _config(tumour_inside_liver=True))
  expected = labels.copy()
  expected[15:18, 15:18, 2:4] = 0
  np.testing.assert_array_equal(out, expected)


def test_postprocess_is_applied_by_the_segmenter(model):
  config, variables = model
  from munet_jax.config import config_from_dict
  cfg = config_from_dict(dict(config.to_dict(), eval=dict(config.eval.to_dict(),
                                                          largest_liver_component=True)))
  hu = _hu((16, 16, 6))
  raw = inference.VolumeSegmenter(variables, config)(hu)
  cleaned = inference.VolumeSegmenter(variables, cfg)(hu)
  np.testing.assert_array_equal(cleaned, inference.postprocess(raw, cfg))


# ----------------------------------------------------------------- predict.py's file plan


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()
  return str(path)


def test_folder_outputs_drop_the_decathlon_channel_suffix(tmp_path):
  _touch(tmp_path / "in" / "liver_3_0000.nii.gz")
  _touch(tmp_path / "in" / "volume-10.nii")
  _touch(tmp_path / "in" / "volume-2.nii.gz")
  _touch(tmp_path / "in" / "notes.txt")
  _touch(tmp_path / "in" / ".hidden.nii.gz")
  pairs = inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"))
  names = [(os.path.basename(a), os.path.basename(b)) for a, b in pairs]
  assert names == [("liver_3_0000.nii.gz", "liver_3.nii.gz"),
                   ("volume-2.nii.gz", "volume-2.nii.gz"), ("volume-10.nii", "volume-10.nii.gz")]


def test_folder_input_leaves_lits_label_files_out(tmp_path, capsys):
  _touch(tmp_path / "in" / "volume-1.nii")
  _touch(tmp_path / "in" / "segmentation-1.nii")
  pairs = inference.plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"))
  assert [os.path.basename(a) for a, _ in pairs] == ["volume-1.nii"]
  assert "1 LiTS label file" in capsys.readouterr().err


def test_file_input_to_a_folder_output_is_named_after_the_input(tmp_path):
  src = _touch(tmp_path / "ct_0000.nii.gz")
  os.makedirs(tmp_path / "out")
  assert inference.plan_outputs(src, str(tmp_path / "out")) == [
      (src, str(tmp_path / "out" / "ct.nii.gz"))]


@pytest.mark.parametrize("setup, message", [
    (lambda t: (str(t / "missing.nii.gz"), str(t / "o.nii.gz")), "--input not found"),
    (lambda t: (_touch(t / "ct.nii.gz"), str(t / "o.png")), "must end in .nii"),
    (lambda t: (_touch(t / "ct.txt"), str(t / "o.nii.gz")), "must be a .nii"),
    (lambda t: (_touch(t / "ct.nii.gz"), str(t / "ct.nii.gz")), "overwrite an input"),
    (lambda t: (os.path.dirname(_touch(t / "in" / "a.nii.gz")), str(t / "in")),
     "overwrite an input"),
    (lambda t: (os.path.dirname(_touch(t / "in" / "a.txt")), str(t / "out")), "no NIfTI"),
    (lambda t: (os.path.dirname(_touch(t / "in" / "a_0001.nii.gz")), str(t / "out")),
     "single-channel"),
    (lambda t: (_touch(t / "in" / "a.nii") and os.path.dirname(_touch(t / "in" / "a.nii.gz")),
                str(t / "out")), "same output name"),
    (lambda t: (os.path.dirname(_touch(t / "in" / "a.nii.gz")), _touch(t / "o.nii.gz")),
     "must be a folder"),
])
def test_bad_predict_paths_are_user_errors(tmp_path, setup, message):
  src, dst = setup(tmp_path)
  with pytest.raises(UserError, match=message):
    inference.plan_outputs(src, dst)


def test_prefetch_keeps_order_and_raises_where_consumed():
  calls = []

  def loader(i):
    def f():
      calls.append(i)
      if i == 2:
        raise UserError("bad 2")
      return i * 10
    return f

  got = []
  with pytest.raises(UserError, match="bad 2"):
    for value in prefetch(loader(i) for i in range(4)):
      got.append(value)
  assert got == [0, 10]
  assert 3 not in calls or calls.index(3) > calls.index(2)


def test_a_run_with_a_reference_hu_segments_the_shifted_volume(model):
  """data.reference_hu: the segmenter shifts each volume, as the training batches are."""
  from munet_jax.preprocessing import intensity_shift, shifted
  config = model[0].copy_and_resolve_references()
  config.model.init_std = 1.0                   # weights large enough to see the input
  variables = munet_jax.init(jax.random.key(4), config)
  on = config.copy_and_resolve_references()
  on.data.reference_hu = 350.0
  on.data.reference_window = (-1000.0, 1000.0)
  hu = np.random.default_rng(5).integers(-200, 200, (16, 16, 6)).astype(np.int16)
  shift = intensity_shift(hu, on)
  assert abs(shift) > 100
  # An ensemble (inference.load_runs) refuses runs whose shifts differ.
  assert inference._computation_key(on) != inference._computation_key(config)                       # a shift that changes the labels
  labels, probs = inference.VolumeSegmenter(variables, on).segment(hu, probabilities=True)
  plain = inference.VolumeSegmenter(variables, config)
  expected = plain.segment(shifted(hu, shift), probabilities=True)
  np.testing.assert_array_equal(labels, expected[0])
  np.testing.assert_array_equal(probs, expected[1])
  assert np.any(probs != plain.segment(hu, probabilities=True)[1])
  # Float input rounds as the store would: the same shift, the same labels.
  np.testing.assert_array_equal(
      inference.VolumeSegmenter(variables, on)(hu.astype(np.float32)), labels)
