"""Tumour detection by lesion size, on hand-made volumes with known answers."""

import numpy as np
import pytest

from munet_jax.lesions import lesion_detection


def _empty(shape=(40, 40, 6)):
  return np.zeros(shape, bool)


def _box(mask, x, y, z):
  mask[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = True
  return mask


def test_lesion_is_small_below_28_by_28_mm2_of_largest_axial_area():
  # 2 x 2 mm pixels: 14 x 14 voxels = 784 mm^2 is not below the bound; 13 x 14 is.
  ref = _empty()
  _box(ref, (0, 14), (0, 14), (0, 2))       # 784 mm^2: large
  _box(ref, (20, 33), (20, 34), (3, 5))     # 728 mm^2: small
  out = lesion_detection(ref, ref, (2.0, 2.0, 5.0))
  assert [r["small"] for r in out["reference"]] == [False, True]
  assert [r["max_area_mm2"] for r in out["reference"]] == [784.0, 728.0]
  assert out["reference"][0]["volume_mm3"] == 14 * 14 * 2 * 20.0
  assert out["small"]["ref_count"] == 1 and out["large"]["ref_count"] == 1


def test_size_is_the_largest_cross_section_not_the_volume():
  # A column 4 x 4 mm in-plane through 6 slices of 10 mm: 960 mm^3 but 16 mm^2 a slice.
  ref = _box(_empty(), (5, 9), (5, 9), (0, 6))
  out = lesion_detection(ref, ref, (1.0, 1.0, 10.0))
  assert out["reference"][0]["small"] and out["reference"][0]["volume_mm3"] == 960.0


def test_axial_axis_decides_which_planes_are_cross_sections():
  ref = _box(np.zeros((6, 40, 40), bool), (0, 6), (0, 30), (0, 30))   # slices along axis 0
  assert not lesion_detection(ref, ref, (1, 1, 1), axial_axis=0)["reference"][0]["small"]
  assert lesion_detection(ref, ref, (1, 1, 1), axial_axis=2)["reference"][0]["small"]


def test_recall_precision_and_dice_per_size_class():
  spacing = (1.0, 1.0, 1.0)
  ref, pred = _empty(), _empty()
  _box(ref, (0, 30), (0, 30), (0, 2))     # large reference lesion, 1800 voxels
  _box(ref, (35, 38), (35, 38), (0, 1))   # small reference lesion, 9 voxels, missed
  _box(pred, (0, 30), (0, 15), (0, 2))    # half of the large lesion: 900 voxels, area 450 -> small
  _box(pred, (35, 38), (0, 3), (4, 5))    # a false positive small lesion, 9 voxels
  out = lesion_detection(pred, ref, spacing)
  small, large, every = out["small"], out["large"], out["all"]
  assert (large["ref_count"], large["ref_detected"]) == (1, 1)
  assert (small["ref_count"], small["ref_detected"]) == (1, 0)
  # Both predicted lesions are small (450 and 9 mm^2); one overlaps a reference lesion.
  assert (small["pred_count"], small["pred_correct"]) == (2, 1)
  assert (large["pred_count"], large["pred_correct"]) == (0, 0)
  assert small["recall"] == 0.0 and large["recall"] == 1.0
  assert small["precision"] == 0.5 and large["precision"] is None
  # Large: A = 1800 voxels, B = the matched prediction (900), |A∩B| = 900.
  assert large["dice"] == pytest.approx(2 * 900 / (1800 + 900))
  # Small: A = 9 voxels (missed), B = the unmatched small false positive (9), no overlap.
  assert (small["intersection"], small["ref_voxels"], small["pred_voxels"]) == (0, 9, 9)
  assert small["dice"] == 0.0
  # 'all' is the plain tumour Dice.
  assert every["dice"] == pytest.approx(2 * 900 / (1809 + 909))
  assert (every["ref_count"], every["pred_count"], every["ref_detected"], every["pred_correct"]) \
      == (2, 2, 1, 1)
  assert [r["detected"] for r in out["reference"]] == [True, False]
  assert out["reference"][0]["dice"] == pytest.approx(2 * 900 / 2700)
  assert out["reference"][1]["dice"] == 0.0


def test_a_prediction_spanning_two_lesions_counts_for_both_classes():
  ref, pred = _empty(), _empty()
  _box(ref, (0, 30), (0, 30), (0, 1))     # large, 900 voxels
  _box(ref, (32, 35), (0, 3), (0, 1))     # small, 9 voxels
  _box(pred, (0, 35), (0, 30), (0, 1))    # one lesion covering both, 1050 voxels
  out = lesion_detection(pred, ref, (1.0, 1.0, 1.0))
  assert out["small"]["ref_detected"] == 1 and out["large"]["ref_detected"] == 1
  assert out["small"]["pred_voxels"] == 1050 and out["large"]["pred_voxels"] == 1050
  assert out["small"]["dice"] == pytest.approx(2 * 9 / (9 + 1050))
  assert out["all"]["dice"] == pytest.approx(2 * 909 / (909 + 1050))


def test_lesions_touching_only_at_an_edge_are_two_with_face_connectivity():
  ref = _empty()
  _box(ref, (0, 3), (0, 3), (0, 3))
  _box(ref, (3, 6), (3, 6), (0, 3))       # shares only an edge with the first
  assert lesion_detection(ref, ref, (1, 1, 1))["all"]["ref_count"] == 2
  assert lesion_detection(ref, ref, (1, 1, 1), connectivity=2)["all"]["ref_count"] == 1


def test_no_lesions_anywhere_gives_zero_counts_and_undefined_rates():
  out = lesion_detection(_empty(), _empty(), (1, 1, 1))
  for size in ("small", "large", "all"):
    assert out[size]["ref_count"] == out[size]["pred_count"] == 0
    assert out[size]["recall"] is None and out[size]["precision"] is None
    assert out[size]["dice"] is None
  assert out["reference"] == []


def test_bound_is_configurable():
  ref = _box(_empty(), (0, 10), (0, 10), (0, 1))   # 100 mm^2
  assert lesion_detection(ref, ref, (1, 1, 1), small_area_mm2=100.0)["large"]["ref_count"] == 1
  assert lesion_detection(ref, ref, (1, 1, 1), small_area_mm2=101.0)["small"]["ref_count"] == 1
