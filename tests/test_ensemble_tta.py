"""Test-time mirroring, probabilities and ensembles: predict.py and eval.py on several runs."""

import json
import os
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

import munet_jax
from munet_jax.cli import evaluate as eval_cli
from munet_jax.cli import predict as predict_cli
from munet_jax.cli import run as run_cli
from munet_jax.inference import VolumeSegmenter
from munet_jax.prediction import PROBABILITY_SCALE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from tiny_run import tiny_run_config  # noqa: E402
from varied_run import TEST_CASES, kfold_runs, phantom  # noqa: E402
# A uint8 probability is round(255 p): within half a step of the float softmax, plus the
# float32 rounding of sums of a few softmaxes (well below 1e-6).
HALF_STEP = 0.5 / PROBABILITY_SCALE + 1e-6


_apply = jax.jit(lambda variables, images: munet_jax.apply(variables, images, tiny_run_config()))


def _cli(module, capsys, *args):
  capsys.readouterr()
  status = run_cli(module.main, [str(a) for a in args])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two folds (kfold, 2 folds, volume-0 and volume-3 held out as test) of varied runs."""
  workdirs, variables, config, data, _ = kfold_runs(str(tmp_path_factory.getbasetemp()
                                                        / "kfold-runs"))
  return workdirs, variables, config, Path(data)


def _softmax(variables, config, hu, axes=()):
  """Reference: the softmax of munet_jax.apply on (X, Y, Z) HU, slices mirrored on `axes`."""
  images = munet_jax.preprocess(np.moveaxis(hu, -1, 0).astype(np.float32), config)[..., None]
  images = np.flip(images, axes) if axes else images
  logits = np.asarray(_apply(variables, images), np.float64)
  logits = np.flip(logits, axes) if axes else logits
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.moveaxis(p / p.sum(-1, keepdims=True), 0, 2)   # (X, Y, Z, classes)


def test_tta_is_off_by_default_and_the_mean_over_the_four_mirrorings(runs):
  _, (variables, _), config, _ = runs
  assert config.eval.tta is False
  hu = phantom((40, 36, 3))
  plain, plain_p = VolumeSegmenter(variables, config).segment(hu, probabilities=True)
  config = tiny_run_config()
  config.eval.tta = True
  labels, p = VolumeSegmenter(variables, config).segment(hu, probabilities=True)
  expected = np.mean([_softmax(variables, config, hu, axes) for axes in ((), (1,), (2,), (1, 2))],
                     axis=0)
  assert np.abs(p / PROBABILITY_SCALE - expected).max() <= HALF_STEP
  clear = np.sort(expected, -1)[..., -1] - np.sort(expected, -1)[..., -2] > 1e-5
  np.testing.assert_array_equal(labels[clear], expected.argmax(-1)[clear])
  assert (labels != plain).any()   # mirroring changes some labels of this network


def test_an_ensemble_is_the_mean_softmax_of_its_runs(runs):
  _, (v0, v1), config, _ = runs
  hu = phantom((40, 36, 3))
  labels, p = VolumeSegmenter([v0, v1], config).segment(hu, probabilities=True)
  expected = (_softmax(v0, config, hu) + _softmax(v1, config, hu)) / 2
  assert np.abs(p / PROBABILITY_SCALE - expected).max() <= HALF_STEP
  clear = np.sort(expected, -1)[..., -1] - np.sort(expected, -1)[..., -2] > 1e-5
  np.testing.assert_array_equal(labels[clear], expected.argmax(-1)[clear])
  assert (labels != VolumeSegmenter(v0, config)(hu)).any()


def test_predict_with_several_runs_writes_labels_and_probabilities_on_the_input_grid(
    runs, tmp_path, capsys):
  workdirs, variables, config, data = runs
  ct = data / "volume-1.nii.gz"
  out = tmp_path / "pred.nii.gz"
  status, _, err = _cli(predict_cli, capsys, "--workdir", *workdirs, "--input", ct,
                        "--output", out, "--tta", "--save-probabilities")
  assert status == 0, err
  image, labels = nib.load(str(ct)), nib.load(str(out))
  probs = nib.load(str(tmp_path / "pred_probabilities.nii.gz"))
  assert probs.shape == (*image.shape, 3) and probs.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(probs.affine, image.affine)
  config = tiny_run_config()
  config.eval.tta = True
  expected_labels, expected_p = VolumeSegmenter(variables, config).segment(
      np.asanyarray(image.dataobj), probabilities=True)   # the synthetic CT is RAS
  np.testing.assert_array_equal(np.asanyarray(labels.dataobj), expected_labels)
  np.testing.assert_array_equal(np.asanyarray(probs.dataobj.get_unscaled()), expected_p)
  # The header's scaling gives probabilities: each class within half a step, sums near 1.
  assert np.abs(probs.get_fdata().sum(-1) - 1).max() <= 3 * HALF_STEP


def test_eval_scores_an_ensemble_as_predict_segments_it(runs, tmp_path, capsys):
  workdirs, _, _, data = runs
  status, _, err = _cli(eval_cli, capsys, "--workdir", *workdirs, "--out", tmp_path / "e.json")
  assert status == 0, err
  document = json.loads((tmp_path / "e.json").read_text())
  assert [c["case"] for c in document["cases"]] == list(TEST_CASES)
  assert [e["workdir"] for e in document["source"]["ensemble"]] == workdirs
  for entry in document["cases"]:
    case = entry["case"]
    status, _, err = _cli(predict_cli, capsys, "--workdir", *workdirs, "--input",
                          data / f"{case}.nii.gz", "--output", tmp_path / f"{case}.nii.gz")
    assert status == 0, err
    pred = np.asanyarray(nib.load(str(tmp_path / f"{case}.nii.gz")).dataobj)
    ref = np.asanyarray(nib.load(str(data / case.replace("volume", "segmentation")
                                     ) + ".nii.gz").dataobj)
    liver_p, liver_r = pred > 0, ref > 0
    assert entry["voxels"]["liver"] == {"both": int((liver_p & liver_r).sum()),
                                        "pred": int(liver_p.sum()), "ref": int(liver_r.sum())}
    assert entry["voxels"]["tumor"]["pred"] == int((pred == 2).sum())


def test_an_ensemble_is_refused_on_a_split_its_runs_do_not_share(runs, tmp_path, capsys):
  workdirs, _, _, _ = runs
  status, _, err = _cli(eval_cli, capsys, "--workdir", *workdirs, "--split", "val",
                        "--out", tmp_path / "e.json")
  assert status == 2 and err.count("\n") == 1
  assert f"{workdirs[1]}: its 'val' split holds other cases" in err
  status, _, err = _cli(eval_cli, capsys, "--workdir", *workdirs)
  assert status == 2 and "an ensemble of 2 runs needs --out F.json" in err


def test_an_ensemble_of_runs_with_other_preprocessing_is_refused(runs, tmp_path, capsys):
  workdirs, _, _, data = runs
  other = kfold_runs(None)[4]
  status, _, err = _cli(predict_cli, capsys, "--workdir", workdirs[0], other,
                        "--input", data / "volume-1.nii.gz", "--output", tmp_path / "p.nii.gz")
  assert status == 2 and err.count("\n") == 1
  assert f"{other}: its model, HU window or HU shift differs" in err
  assert not os.path.exists(tmp_path / "p.nii.gz")
