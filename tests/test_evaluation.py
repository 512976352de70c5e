"""Scoring, results.json, global Dice, the printed table, label-file pairing, overlays."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import REAL_CT, needs_real_ct
from munet_jax import evaluation, overlays
from munet_jax.data import nifti
from munet_jax.errors import UserError



def _labels(shape=(20, 20, 6)):
  return np.zeros(shape, np.uint8)


def _case(name, pred, ref, spacing=(1.0, 1.0, 2.0)):
  return evaluation.score_case(name, pred, ref, spacing)


def test_score_case_scores_liver_as_labels_1_and_2_and_tumour_as_label_2():
  ref, pred = _labels(), _labels()
  ref[2:10, 2:10, 1:4] = 1
  ref[4:6, 4:6, 2] = 2
  pred[2:10, 2:10, 1:4] = 1
  pred[4:6, 4:6, 2] = 1                        # tumour called liver: liver still perfect
  entry = _case("a", pred, ref)
  assert entry["liver"]["dsc"] == 1.0 and entry["liver"]["mssd"] == 0.0
  assert entry["tumor"]["dsc"] == 0.0 and entry["tumor"]["rvd"] == -1.0
  assert entry["voxels"]["tumor"] == {"both": 0, "pred": 0, "ref": 4}
  assert entry["spacing"] == [1.0, 1.0, 2.0]
  assert set(entry["liver"]) == {"dsc", "voe", "rvd", "assd", "mssd", "rmsd", "hd95", "nsd"}
  assert entry["liver"]["hd95"] == 0.0 and entry["liver"]["nsd"] == 1.0
  assert entry["tumor"]["hd95"] == float("inf") and entry["tumor"]["nsd"] == 0.0


def test_score_case_passes_the_nsd_tolerance():
  # A 8 x 8 x 3 block against the same block one voxel wider along axis 0 (1 mm):
  # S(pred) voxels on the moved face are 1 mm from S(ref), all others 0 mm.
  ref, pred = _labels(), _labels()
  ref[2:10, 2:10, 1:4] = 1
  pred[2:11, 2:10, 1:4] = 1
  spacing = (1.0, 1.0, 2.0)
  moved = evaluation.score_case("a", pred, ref, spacing, nsd_tolerance_mm=0.5)["liver"]
  within = evaluation.score_case("a", pred, ref, spacing, nsd_tolerance_mm=1.0)["liver"]
  assert within["nsd"] == 1.0 and 0.0 < moved["nsd"] < 1.0
  assert moved["hd95"] == within["hd95"]


def test_non_finite_values_are_null_in_json_and_left_out_of_the_summary():
  ref, pred = _labels(), _labels()
  ref[2:10, 2:10, 1:4] = 1
  pred[2:10, 2:10, 1:4] = 1
  pred[3, 3, 2] = 2                            # tumour predicted, none in the reference
  with_fp = _case("fp", pred, ref)
  both_empty = _case("clean", ref, ref)
  document = evaluation.results([with_fp, both_empty])
  text = json.dumps(document, allow_nan=False)  # no inf / NaN survives
  back = json.loads(text)
  fp = back["cases"][0]["tumor"]
  assert fp["rvd"] is None and fp["assd"] is None and fp["mssd"] is None and fp["dsc"] == 0.0
  assert fp["hd95"] is None and fp["nsd"] == 0.0
  summary = back["summary"]["tumor"]
  assert summary["assd"] == {"mean": 0.0, "std": 0.0, "n": 1}   # only the both-empty case
  assert summary["dsc"] == {"mean": 0.5, "std": 0.5, "n": 2}
  assert summary["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1}
  assert summary["nsd"] == {"mean": 0.5, "std": 0.5, "n": 2}


def test_summary_is_mean_and_population_std_over_cases():
  cases = [{"liver": {m: v for m in evaluation.METRIC_NAMES}, "tumor": {m: None for m in
                                                                   evaluation.METRIC_NAMES}}
           for v in (0.9, 0.8, 1.0)]
  summary = evaluation.summarize(cases)
  assert summary["liver"]["dsc"]["mean"] == pytest.approx(0.9)
  assert summary["liver"]["dsc"]["std"] == pytest.approx(np.std([0.9, 0.8, 1.0]))
  assert summary["liver"]["dsc"]["n"] == 3
  assert summary["tumor"]["dsc"] == {"mean": None, "std": None, "n": 0}


def test_global_dice_pools_all_volumes():
  big_ref, big_pred = _labels(), _labels()
  big_ref[0:10, 0:10, :] = 1
  big_pred[0:10, 0:10, :] = 1                  # 600 voxels, perfect
  small_ref, small_pred = _labels(), _labels()
  small_ref[0:2, 0:2, 0] = 1                   # 4 voxels
  small_pred[0:2, 0:1, 0] = 1                  # 2 of them
  cases = [_case("big", big_pred, big_ref), _case("small", small_pred, small_ref)]
  g = evaluation.global_dice(cases)
  assert g["liver"] == pytest.approx(2 * 602 / (602 + 604))
  assert g["tumor"] == 1.0                      # no tumour anywhere
  mean_dice = np.mean([c["liver"]["dsc"] for c in cases])
  assert abs(g["liver"] - mean_dice) > 0.1     # pooled, not averaged


def test_results_document_has_spec_keys_and_the_extras():
  ref = _labels()
  ref[2:10, 2:10, 1:4] = 1
  ref[3:5, 3:5, 2:3] = 2
  document = evaluation.results([_case("volume-3", ref, ref)], source={"pred": "P"})
  assert set(document) == {"cases", "summary", "global_dice", "lesion_detection", "source"}
  case = document["cases"][0]
  assert case["case"] == "volume-3" and {"spacing", "liver", "tumor"} <= set(case)
  assert set(document["summary"]) == {"liver", "tumor"}
  assert set(document["summary"]["liver"]["mssd"]) == {"mean", "std", "n"}
  detection = document["lesion_detection"]
  assert detection["small_area_mm2"] == 784.0 and detection["connectivity"] == 1
  assert detection["small"]["recall"] == 1.0 and detection["large"]["reference_lesions"] == 0


def test_lesion_summary_pools_counts_over_cases():
  ref_a, pred_a = _labels((40, 40, 4)), _labels((40, 40, 4))
  ref_a[0:3, 0:3, 0] = 2
  ref_a[10:13, 10:13, 0] = 2
  pred_a[0:3, 0:3, 0] = 2                      # one of two found
  ref_b, pred_b = _labels((40, 40, 4)), _labels((40, 40, 4))
  ref_b[0:3, 0:3, 0] = 2
  pred_b[0:3, 0:3, 0] = 2
  pred_b[20:22, 20:22, 2] = 2                  # and a false positive
  cases = [_case("a", pred_a, ref_a), _case("b", pred_b, ref_b)]
  small = evaluation.lesion_summary(cases)["small"]
  assert (small["reference_lesions"], small["detected"]) == (3, 2)
  assert (small["predicted_lesions"], small["correct"]) == (3, 2)
  assert small["recall"] == pytest.approx(2 / 3) and small["precision"] == pytest.approx(2 / 3)
  assert small["dice"] == pytest.approx(2 * 18 / (27 + 22))


def test_format_table_prints_percent_and_mm_rows_and_detection():
  ref, pred = _labels(), _labels()
  ref[2:10, 2:10, 1:4] = 1
  pred[2:10, 2:9, 1:4] = 1
  document = evaluation.results([_case("a", pred, ref)])
  table = evaluation.format_table(document)
  dsc = document["summary"]["liver"]["dsc"]["mean"]
  liver = next(line for line in table.splitlines() if line.startswith("liver"))
  assert f"{100 * dsc:.2f} ± 0.00" in liver
  tumour = next(line for line in table.splitlines() if line.startswith("tumour"))
  assert "100.00 ± 0.00" in tumour             # both empty: DSC 1 by SPEC
  assert "global Dice: liver" in table and "tumour detection" in table
  small = next(line for line in table.splitlines() if line.startswith("small"))
  assert small.split() == ["small", "0", "0", "-", "-", "-"]


def test_format_table_takes_the_metrics_asked_for():
  ref, pred = _labels(), _labels()
  ref[2:10, 2:10, 1:4] = 1
  pred[2:11, 2:10, 1:4] = 1
  document = evaluation.results([evaluation.score_case("a", pred, ref, (1.0, 1.0, 2.0),
                                                       nsd_tolerance_mm=0.5)])
  head, _, liver = evaluation.format_table(
      document, evaluation.table_metrics("dsc, HD95,nsd")).splitlines()[:3]
  assert head.split() == ["DSC", "%", "HD95", "mm", "NSD", "%", "n"]
  s = document["summary"]["liver"]
  assert liver.split()[1:] == [f"{100 * s['dsc']['mean']:.2f}", "±", "0.00",
                               f"{s['hd95']['mean']:.2f}", "±", "0.00",
                               f"{100 * s['nsd']['mean']:.2f}", "±", "0.00", "1"]
  assert 0 < s["nsd"]["mean"] < 1 and s["hd95"]["mean"] > 0
  default = evaluation.format_table(document).splitlines()[0]
  assert default.split()[::2] == ["DSC", "VOE", "RVD", "ASSD", "MSSD", "n"]
  # An older results file without these keys shows "-".
  del document["summary"]["liver"]["nsd"]
  liver = evaluation.format_table(document, ("dsc", "nsd")).splitlines()[2]
  assert liver.split()[-2:] == ["-", "1"]
  with pytest.raises(UserError, match="unknown metric.*hd99"):
    evaluation.table_metrics("dsc,hd99")
  with pytest.raises(UserError, match="unknown metric"):
    evaluation.table_metrics(" , ")


def test_format_table_says_which_means_leave_volumes_out():
  ref_a, pred_a = _labels(), _labels()
  ref_a[2:10, 2:10, 1:4] = 1
  pred_a[2:10, 2:10, 1:4] = 1
  ref_a[3:5, 3:5, 2] = 2                       # a tumour the prediction misses: distances inf
  ref_b, pred_b = ref_a.copy(), pred_a.copy()
  pred_b[3:5, 3:5, 2] = 2                      # found here: finite distances
  document = evaluation.results([_case("a", pred_a, ref_a), _case("b", pred_b, ref_b)])
  assert document["summary"]["tumor"]["assd"]["n"] == 1
  lines = evaluation.format_table(document).splitlines()
  assert next(line for line in lines if line.startswith("tumour")).split()[-1] == "2"
  note = next(line for line in lines if line.startswith("infinite or undefined"))
  assert "tumour ASSD over 1 of 2" in note and "tumour MSSD over 1 of 2" in note
  assert "liver" not in note
  # Every value defined: no such line.
  complete = evaluation.results([_case("b", pred_b, ref_b)])
  assert "infinite or undefined" not in evaluation.format_table(complete)


def test_write_json_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
  path = tmp_path / "eval" / "results.json"
  evaluation.write_json(str(path), {"a": 1})
  with pytest.raises(ValueError):
    evaluation.write_json(str(path), {"a": float("nan")})   # refused by allow_nan=False
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(path.parent) == ["results.json"]       # no temporary file left


def test_write_json_into_a_file_as_folder_is_a_user_error(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(UserError, match="cannot write"):
    evaluation.write_json(str(tmp_path / "f" / "r.json"), {})


# ---------------------------------------------------------------- --pred / --ref pairing


def _write(path, labels, affine=np.eye(4)):
  nifti.write_image(str(path), labels.astype(np.uint8), affine)
  return str(path)


def test_label_pairs_match_by_name_across_nii_and_nii_gz_and_lits_names(tmp_path):
  lab = _labels((4, 4, 4))
  for name in ("liver_1.nii.gz", "volume-2.nii.gz"):
    _write(tmp_path / "p" / name, lab)
  _write(tmp_path / "r" / "liver_1.nii", lab)
  _write(tmp_path / "r" / "segmentation-2.nii", lab)
  _write(tmp_path / "r" / "extra.nii.gz", lab)
  pairs = evaluation.label_pairs(str(tmp_path / "p"), str(tmp_path / "r"))
  assert [(c, os.path.basename(r)) for c, _, r in pairs] == [
      ("liver_1", "liver_1.nii"), ("volume-2", "segmentation-2.nii")]


def test_a_prediction_without_reference_is_an_error_naming_it(tmp_path):
  _write(tmp_path / "p" / "a.nii.gz", _labels((4, 4, 4)))
  _write(tmp_path / "p" / "b.nii.gz", _labels((4, 4, 4)))
  _write(tmp_path / "r" / "a.nii.gz", _labels((4, 4, 4)))
  with pytest.raises(UserError, match=r"b\.nii\.gz: no reference file"):
    evaluation.label_pairs(str(tmp_path / "p"), str(tmp_path / "r"))


@pytest.mark.parametrize("make, message", [
    (lambda t: (str(t / "nope"), str(t)), "--pred not found"),
    (lambda t: (os.makedirs(t / "p") or str(t / "p"), str(t)), "no NIfTI files"),
    (lambda t: (_write(t / "a.nii.gz", _labels((4, 4, 4))), str(t)), "two files or two folders"),
])
def test_bad_pred_ref_arguments_are_user_errors(tmp_path, make, message):
  pred, ref = make(tmp_path)
  with pytest.raises(UserError, match=message):
    evaluation.label_pairs(pred, ref)


def test_prediction_on_another_grid_is_an_error(tmp_path):
  lab = _labels((8, 8, 4))
  _write(tmp_path / "r" / "a.nii.gz", lab)
  shifted = np.eye(4)
  shifted[0, 3] = 1.5
  _write(tmp_path / "p" / "a.nii.gz", lab, shifted)
  with pytest.raises(UserError, match=r"p/a\.nii\.gz: prediction affine differs"):
    evaluation.evaluate_folders(str(tmp_path / "p"), str(tmp_path / "r"),
                                str(tmp_path / "out.json"), progress=False)
  _write(tmp_path / "p" / "a.nii.gz", _labels((8, 8, 5)))
  with pytest.raises(UserError, match="prediction shape"):
    evaluation.evaluate_folders(str(tmp_path / "p"), str(tmp_path / "r"),
                                str(tmp_path / "out.json"), progress=False)
  assert not (tmp_path / "out.json").exists()


@needs_real_ct
def test_evaluate_folders_on_the_real_liver_masks_agrees_with_medpy(tmp_path):
  os.makedirs(tmp_path / "p")
  os.makedirs(tmp_path / "r")
  shutil.copy(os.path.join(REAL_CT, "liver_mask_b.nii.gz"), tmp_path / "p" / "abd.nii.gz")
  shutil.copy(os.path.join(REAL_CT, "liver_mask_a.nii.gz"), tmp_path / "r" / "abd.nii.gz")
  out = tmp_path / "res.json"
  evaluation.evaluate_folders(str(tmp_path / "p"), str(tmp_path / "r"), str(out), progress=False)
  liver = json.loads(out.read_text())["cases"][0]["liver"]
  # medpy 0.5.2 on this pair (shared/data/real_ct/README.md)
  for key, value in {"dsc": 0.98136, "voe": 0.03661, "rvd": 0.01853, "assd": 0.53743,
                     "mssd": 9.48683}.items():
    assert liver[key] == pytest.approx(value, abs=6e-5), key


def test_volumes_are_scored_in_ras_order_whatever_the_file_order(tmp_path):
  ref = _labels((12, 10, 6))
  ref[2:8, 3:7, 1:5] = 1
  ref[3:5, 4:6, 2:3] = 2
  pred = np.roll(ref, 1, axis=0)
  spacing = (0.8, 0.7, 2.5)
  ras = np.diag(spacing + (1.0,))
  # The same volumes stored LPS with slices running down: axes flipped in the file.
  lps = np.diag((-spacing[0], -spacing[1], -spacing[2], 1.0))
  flip = lambda a: a[::-1, ::-1, ::-1]
  for folder, affine, f in (("ras", ras, lambda a: a), ("lps", lps, flip)):
    _write(tmp_path / folder / "p" / "a.nii.gz", f(pred), affine)
    _write(tmp_path / folder / "r" / "a.nii.gz", f(ref), affine)
  docs = [evaluation.evaluate_folders(str(tmp_path / k / "p"), str(tmp_path / k / "r"),
                                      str(tmp_path / k / "o.json"), progress=False)
          for k in ("ras", "lps")]
  assert docs[0]["cases"][0] == docs[1]["cases"][0]
  assert docs[0]["cases"][0]["spacing"] == pytest.approx(list(spacing))


# ---------------------------------------------------------------------------- overlays


def test_choose_slices_picks_tumour_error_and_liver_slices():
  ref, pred = _labels((10, 10, 12)), _labels((10, 10, 12))
  ref[:, :, 2:10] = 1
  ref[0:8, 0:8, 7] = 1                       # no-op; the liver is the same on every slice
  ref[1:5, 1:5, 3] = 2                       # largest tumour on slice 3
  ref[1:2, 1:2, 8] = 2
  pred[:] = ref
  pred[0:6, 0:6, 5] = 0                      # most errors on slice 5
  chosen = overlays.choose_slices(pred, ref, 5)
  assert chosen[:2] == [(3, "tumour"), (5, "error")]
  assert chosen[2][1] == "liver" and len(chosen) == 5
  assert len({i for i, _ in chosen}) == 5 and all(2 <= i <= 9 for i, _ in chosen)
  assert overlays.choose_slices(pred, ref, 1) == [(3, "tumour")]


def test_choose_slices_never_repeats_and_stops_when_slices_run_out():
  ref = _labels((6, 6, 3))
  chosen = overlays.choose_slices(ref, ref, 10)
  assert sorted(i for i, _ in chosen) == [0, 1, 2]


def test_overlays_are_written_as_png(tmp_path):
  hu = np.random.default_rng(0).integers(-200, 200, (16, 12, 4)).astype(np.int16)
  ref = _labels((16, 12, 4))
  ref[3:10, 2:8, 1:3] = 1
  ref[4:6, 3:5, 2] = 2
  pred = ref.copy()
  pred[3:10, 2:8, 1] = 0                     # the liver missed on slice 1
  paths = overlays.write_case_overlays(str(tmp_path), "case/1", hu, pred, ref,
                                       (0.8, 0.8, 2.0), 2)
  assert [os.path.basename(p) for p in paths] == ["case_1_z002_tumour.png",
                                                  "case_1_z001_error.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
