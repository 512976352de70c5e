"""munet_jax.postprocessing: the clean-up steps, choosing them on validation volumes."""

import json

import numpy as np
import pytest

from munet_jax import postprocessing
from munet_jax.errors import UserError


def _volume():
  """A liver (10x10x4) with a tumour inside, a stray 2x2x2 liver blob, a stray tumour."""
  labels = np.zeros((24, 24, 6), np.uint8)
  labels[2:12, 2:12, 1:5] = 1
  labels[5:8, 5:8, 2:4] = 2              # inside the liver
  labels[18:20, 18:20, 1:3] = 1          # a second, smaller liver component
  labels[15:17, 2:4, 1:3] = 2            # tumour touching no liver
  return labels


def test_apply_each_step():
  labels = _volume()
  assert postprocessing.apply(labels, {}) is labels
  assert postprocessing.apply(labels, None) is labels
  lcc = postprocessing.apply(labels, {"largest_liver_component": True})
  assert not lcc[18:20, 18:20].any() and not lcc[15:17, 2:4].any()
  assert (lcc[2:12, 2:12] == labels[2:12, 2:12]).all()
  inside = postprocessing.apply(labels, {"tumour_inside_liver": True})
  assert not inside[15:17, 2:4].any()                  # the stray tumour is gone
  assert (inside[18:20, 18:20, 1:3] == 1).all()        # liver components stay
  assert (inside[5:8, 5:8, 2:4] == 2).all()
  assert (labels == _volume()).all()                   # the input is not changed


def test_the_inference_function_follows_the_config():
  from conftest import make_tiny_config
  from munet_jax.inference import postprocess
  c = make_tiny_config()
  c.eval.tumour_inside_liver = True
  out = postprocess(_volume(), c)
  assert (out == postprocessing.apply(_volume(), {"tumour_inside_liver": True})).all()


def test_choose_keeps_steps_that_help_and_drops_those_that_hurt():
  ref = _volume()
  ref[18:20, 18:20] = 0
  ref[15:17, 2:4] = 0                       # the reference has neither stray object
  decision = postprocessing.choose([_volume()], [ref])
  assert decision["choice"] == {"largest_liver_component": True, "tumour_inside_liver": False,
                                "min_tumour_liver_share": 0.0, "min_tumour_voxels": 0}
  # Once the largest component is kept, the stray tumour is already gone: no gain left.
  first, second = decision["trials"]
  assert first["kept"] and first["with"]["liver_dice"] > first["without"]["liver_dice"]
  assert not second["kept"] and second["with"] == second["without"]

  # A reference whose liver really has two components: dropping one lowers the liver
  # Dice, so only the tumour step is kept.
  ref = _volume()
  ref[15:17, 2:4] = 0
  decision = postprocessing.choose([_volume()], [ref])
  assert decision["choice"] == {"largest_liver_component": False, "tumour_inside_liver": True,
                                "min_tumour_liver_share": 0.0, "min_tumour_voxels": 0}
  # Liver Dice without the step is exact: |pred liver+tumour| = 416, |ref| = 408, all of
  # ref inside pred; with it the stray tumour (8 voxels) goes and the two agree.
  trial = decision["trials"][1]
  assert trial["without"]["liver_dice"] == pytest.approx(2 * 408 / (416 + 408))
  assert trial["with"]["liver_dice"] == 1.0
  assert trial["without"]["tumour_dice"] == pytest.approx(2 * 18 / (26 + 18))


def test_choice_is_saved_and_loaded(tmp_path):
  assert postprocessing.load_choice(str(tmp_path)) is None
  decision = postprocessing.choose([_volume()], [_volume()])
  path = postprocessing.save_choice(str(tmp_path), decision)
  assert json.load(open(path))["choice"] == decision["choice"]
  assert postprocessing.load_choice(str(tmp_path)) == decision["choice"]
  with open(path, "w") as f:
    f.write('{"choice": {"largest_liver_component": 1}}')
  with pytest.raises(UserError, match="postprocessing.json"):
    postprocessing.load_choice(str(tmp_path))
  # A choice written before the size and share steps existed: both are off.
  with open(path, "w") as f:
    f.write('{"choice": {"largest_liver_component": true, "tumour_inside_liver": false}}')
  assert postprocessing.load_choice(str(tmp_path)) == {
      "largest_liver_component": True, "tumour_inside_liver": False,
      "min_tumour_liver_share": 0.0, "min_tumour_voxels": 0}
  for bad in ("-1", "2.5", "true", '"8"'):
    with open(path, "w") as f:
      f.write('{"choice": {"largest_liver_component": true, "tumour_inside_liver": false, '
              f'"min_tumour_voxels": {bad}}}}}')
    with pytest.raises(UserError, match="min_tumour_voxels"):
      postprocessing.load_choice(str(tmp_path))
  for bad in ("-0.1", "1.5", "true", '"0.5"', "NaN"):
    with open(path, "w") as f:
      f.write('{"choice": {"largest_liver_component": true, "tumour_inside_liver": false, '
              f'"min_tumour_liver_share": {bad}}}}}')
    with pytest.raises(UserError, match="min_tumour_liver_share"):
      postprocessing.load_choice(str(tmp_path))


def _with_specks():
  """A liver with a 27-voxel tumour, and three tumour specks of 1, 2 and 3 voxels."""
  labels = np.zeros((24, 24, 8), np.uint8)
  labels[2:20, 2:20, 1:7] = 1
  labels[4:7, 4:7, 2:5] = 2              # the real lesion, 27 voxels
  labels[12, 12, 3] = 2                  # 1 voxel
  labels[15, 15:17, 3] = 2               # 2 voxels
  labels[9, 16:19, 5] = 2                # 3 voxels
  return labels


def test_min_size_turns_small_tumour_components_into_liver():
  labels = _with_specks()
  out = postprocessing.apply(labels, {"min_tumour_voxels": 3})
  assert out[12, 12, 3] == 1 and (out[15, 15:17, 3] == 1).all()   # below 3: liver now
  assert (out[9, 16:19, 5] == 2).all() and (out[4:7, 4:7, 2:5] == 2).all()
  assert ((out > 0) == (labels > 0)).all()                         # the liver mask stays
  assert postprocessing.apply(labels, {"min_tumour_voxels": 0}) is labels
  assert (postprocessing.apply(labels, {"min_tumour_voxels": 28}) != 2).all()
  assert (labels == _with_specks()).all()


def test_the_min_size_is_chosen_by_lesion_f1_on_the_validation_volumes():
  ref = _with_specks()
  ref[ref == 2] = 1
  ref[4:7, 4:7, 2:5] = 2                 # only the real lesion is tumour
  decision = postprocessing.choose([_with_specks()], [ref])
  # 0: 1 of 4 predicted lesions correct; 2: 1 of 3; 4 drops all three specks, the
  # lesion stays (F1 1); 8, 16 score the same and the smaller size wins; 32 and up drop it.
  by_size = {t["min_tumour_voxels"]: t for t in decision["component_trials"]
             if t["min_tumour_liver_share"] == 0}
  assert sorted(by_size) == [0, 2, 4, 8, 16, 32, 64, 128]
  assert by_size[0]["lesion_precision"] == 0.25 and by_size[0]["lesion_recall"] == 1.0
  assert by_size[2]["predicted_lesions"] == 3
  assert by_size[4]["lesion_f1"] == 1.0 and by_size[32]["lesion_f1"] == 0.0
  assert decision["choice"]["min_tumour_voxels"] == 4
  # Specks that are real lesions of the validation volumes keep the size at 0.
  decision = postprocessing.choose([_with_specks()], [_with_specks()])
  assert decision["choice"]["min_tumour_voxels"] == 0


def test_a_config_can_fix_the_min_size():
  from conftest import make_tiny_config
  from munet_jax.inference import postprocess
  c = make_tiny_config()
  c.eval.min_tumour_voxels = 4
  assert (postprocess(_with_specks(), c)
          == postprocessing.apply(_with_specks(), {"min_tumour_voxels": 4})).all()


def test_eval_and_predict_apply_the_runs_choice(tmp_path, monkeypatch):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
  from tiny_run import make_tiny_run
  from munet_jax import evaluation, inference
  from munet_jax.data import synthetic
  data, workdir = tmp_path / "data", tmp_path / "work"
  synthetic.write_dataset(str(data), 4, 32, seed=1, slices=4, progress=False)
  make_tiny_run(str(workdir), str(data))
  seen = []
  real_apply = postprocessing.apply
  monkeypatch.setattr(postprocessing, "apply",
                      lambda labels, choice: seen.append(dict(choice)) or real_apply(labels, choice))
  chosen = {"largest_liver_component": False, "tumour_inside_liver": True,
            "min_tumour_liver_share": 0.25, "min_tumour_voxels": 3}
  postprocessing.save_choice(str(workdir), {"choice": chosen})
  document, _ = evaluation.evaluate_run(str(workdir), progress=False)
  assert document["source"]["postprocessing"] == chosen
  assert len(seen) == 2 and all(c == chosen for c in seen)       # the two test volumes
  seen.clear()
  inference.predict_path(str(workdir), str(data / "volume-0.nii.gz"), str(tmp_path / "p.nii.gz"),
                         progress=False)
  assert seen == [chosen]


def _brute_liver_share(labels, component):
  """Liver share of one tumour component (a bool mask), face by face in Python loops."""
  faces = liver = 0
  for x, y, z in zip(*np.nonzero(component)):
    for axis in range(3):
      for step in (-1, 1):
        n = [x, y, z]
        n[axis] += step
        if not 0 <= n[axis] < labels.shape[axis] or labels[tuple(n)] == 2:
          continue
        faces += 1
        liver += labels[tuple(n)] == 1
  return 1.0 if faces == 0 else liver / faces


def _bordering():
  """A liver block; a tumour inside it, one half out of it, one outside touching it by one
  face, one with no neighbour but the volume's edge and tumour, and one speck."""
  labels = np.zeros((20, 20, 8), np.uint8)
  labels[2:12, 2:12, 1:7] = 1
  labels[5:8, 5:8, 2:5] = 2                 # inside: share 1
  labels[10:14, 4:7, 2:4] = 2               # half in, half out of the liver
  labels[12:16, 9:11, 3:5] = 2              # outside; its face x=12 touches liver x=11
  labels[11, 9:11, 3:5] = 1
  labels[17:20, 17:20, 0:8] = 2             # touches only background and the volume's edge
  labels[3, 10, 3] = 2                      # one voxel inside the liver
  return labels


def test_the_liver_share_counts_faces_as_a_loop_over_voxels_does():
  from scipy import ndimage
  labels = _bordering()
  faces = ndimage.generate_binary_structure(3, 1)
  tumours, n = ndimage.label(labels == 2, structure=faces)
  shares = postprocessing.liver_share(labels, tumours, n)
  assert n == 5 and shares.shape == (6,)
  for i in range(1, n + 1):
    assert shares[i] == pytest.approx(_brute_liver_share(labels, tumours == i), abs=1e-15)
  by_voxel = {(6, 6, 3): 1.0, (3, 10, 3): 1.0, (18, 18, 4): 0.0}
  for voxel, share in by_voxel.items():
    assert shares[tumours[voxel]] == share
  assert 0 < shares[tumours[12, 5, 2]] < 1
  assert shares[tumours[13, 9, 3]] == 4 / 40   # 4 of its 40 faces border the liver
  rng = np.random.default_rng(0)
  for _ in range(20):     # random label volumes: blobs of all three labels
    labels = rng.integers(0, 3, (9, 8, 7)).astype(np.uint8)
    labels = ndimage.median_filter(labels, size=2)
    tumours, n = ndimage.label(labels == 2, structure=faces)
    shares = postprocessing.liver_share(labels, tumours, n)
    for i in range(1, n + 1):
      assert shares[i] == pytest.approx(_brute_liver_share(labels, tumours == i), abs=1e-15)


def test_min_liver_share_turns_tumour_that_borders_little_liver_into_background():
  labels = _bordering()
  out = postprocessing.apply(labels, {"min_tumour_liver_share": 0.3})
  assert (out[12:16, 9:11, 3:5] == 0).all() and (out[17:20, 17:20] == 0).all()
  assert (out[5:8, 5:8, 2:5] == 2).all() and out[3, 10, 3] == 2
  assert (out[10:14, 4:7, 2:4] == 2).all()          # half in: share above 0.3
  assert (out[labels != 2] == labels[labels != 2]).all()
  both = postprocessing.apply(labels, {"min_tumour_liver_share": 0.3, "min_tumour_voxels": 2})
  assert both[3, 10, 3] == 1                          # the speck: liver (size step)
  assert (both[12:16, 9:11, 3:5] == 0).all()          # dropped by both: background
  assert (postprocessing.apply(labels, {"min_tumour_liver_share": 0.0}) is labels)
  assert (labels == _bordering()).all()


def _random_case(rng):
  """A liver ball with tumour balls inside, across its border and outside it, and specks."""
  shape = (28, 26, 10)
  grid = np.indices(shape).astype(float)
  def ball(c, r):
    return sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r
  labels = np.zeros(shape, np.uint8)
  labels[ball((13, 13, 5), rng.uniform(7, 10))] = 1
  for _ in range(rng.integers(2, 8)):
    labels[ball(rng.uniform((2, 2, 1), (26, 24, 9)), rng.uniform(0.6, 3.5))] = 2
  if rng.random() < 0.5:
    labels[rng.integers(0, 28), rng.integers(0, 26), :] = 1   # a stray liver line
  return labels


def test_choose_scores_every_pair_as_applying_it_would():
  """The component tables give exactly the scores of `apply` then `lesion_score` / `_score`."""
  rng = np.random.default_rng(7)
  for trial in range(6):
    preds = [_random_case(rng) for _ in range(3)]
    refs = [_random_case(rng) for _ in range(3)]
    refs[0] = preds[0].copy()
    refs[0][refs[0] == 2] = 1 if trial % 2 else 2       # every lesion false, or all real
    decision = postprocessing.choose(preds, refs, min_sizes=(0, 3, 20),
                                     liver_shares=(0.0, 0.2, 0.5, 0.9))
    kept = {s: decision["choice"][s] for s in postprocessing.STEPS}
    current = [postprocessing.apply(p, kept) for p in preds]
    assert len(decision["component_trials"]) == 12
    for t in decision["component_trials"]:
      step = {"min_tumour_liver_share": t["min_tumour_liver_share"],
              "min_tumour_voxels": t["min_tumour_voxels"]}
      done = [postprocessing.apply(p, step) for p in current]
      want = {**postprocessing.lesion_score(done, refs), **postprocessing._score(done, refs)}
      got = {k: t[k] for k in want}
      assert got == pytest.approx(want, abs=1e-12), (trial, step)
    best = max(decision["component_trials"], key=lambda t: t["lesion_f1"])
    assert decision["choice"]["min_tumour_voxels"] == best["min_tumour_voxels"] or (
        best["lesion_f1"] == max(t["lesion_f1"] for t in decision["component_trials"]))


def test_the_liver_share_is_chosen_when_false_tumour_lies_outside_the_liver():
  pred = _bordering()
  pred[3, 10, 3] = 1
  ref = pred.copy()
  ref[12:16, 9:11, 3:5] = 0                 # not a lesion: outside the liver
  ref[17:20, 17:20] = 0
  decision = postprocessing.choose([pred], [ref])
  # The false lesions' shares are 0.1 (4 of 40 faces) and 0. A component is dropped
  # below the share, so 0.1 keeps the first; 0.2 drops both (F1 1), larger shares score
  # the same until the half-out lesion goes, and ties go to the smaller share.
  assert decision["choice"]["min_tumour_liver_share"] == 0.2
  assert decision["choice"]["min_tumour_voxels"] == 0
  off = [t for t in decision["component_trials"]
         if t["min_tumour_liver_share"] == 0 and t["min_tumour_voxels"] == 0][0]
  # The largest liver component, kept first, has already removed the isolated block.
  assert decision["choice"]["largest_liver_component"]
  assert off["lesion_precision"] == 2 / 3 and off["lesion_recall"] == 1.0
