"""Post-processing of predicted labels, and choosing it on the validation split.

Three optional steps, applied in this order:
  largest_liver_component  keep the largest 6-connected component of liver + tumour;
                           everything else becomes background.
  tumour_inside_liver       tumour components (6-connected) with no liver voxel among
                           their face neighbours become background.
  min_tumour_voxels         tumour components (6-connected) of fewer voxels than this
                           become liver (0: off). The liver mask (liver + tumour) does
                           not change; only the tumour call is dropped.

A run either fixes them in its config (`eval.largest_liver_component`,
`eval.tumour_inside_liver`, `eval.min_tumour_voxels`) or, with
`eval.choose_postprocessing`, learns them at the end of training the way nnU-Net does:
the validation volumes are segmented once without post-processing, then each of the two
clean-up steps in turn is tried on top of the steps kept so far and is kept only when it
raises the validation score and lowers none of it (the score: liver Dice, mean over the
volumes; tumour Dice pooled over the volumes). Last, the smallest tumour size is chosen
among `MIN_TUMOUR_CANDIDATES` as the one with the best lesion-wise F1 on the validation
volumes (the harmonic mean of lesion recall and precision, over all their lesions, with
the hit criterion of `munet_jax.lesions`; ties go to the smaller size, so 0 unless
dropping components helps). The choice and the numbers behind it are written to
`WORKDIR/postprocessing.json`; `eval.py`, `predict.py` and the trainer's final evaluation
apply it (`load_choice`, `apply`), and the config's values when a run has no such file.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from munet_jax.errors import UserError
from munet_jax.lesions import lesion_detection

STEPS = ("largest_liver_component", "tumour_inside_liver")   # on / off
MIN_SIZE = "min_tumour_voxels"                               # a size, 0 = off
MIN_TUMOUR_CANDIDATES = (0, 2, 4, 8, 16, 32, 64, 128)
FILE = "postprocessing.json"
_FACES = ndimage.generate_binary_structure(3, 1)


def from_config(config) -> dict:
  """The steps a config fixes (`eval.largest_liver_component`, `eval.tumour_inside_liver`,
  `eval.min_tumour_voxels`)."""
  choice = {step: bool(config.eval[step]) for step in STEPS}
  choice[MIN_SIZE] = int(config.eval[MIN_SIZE])
  return choice


def normalise(choice: dict | None) -> dict:
  """Every step of a choice, with its default (off, 0) where the choice does not name it."""
  choice = choice or {}
  out = {step: bool(choice.get(step, False)) for step in STEPS}
  out[MIN_SIZE] = int(choice.get(MIN_SIZE, 0))
  return out


def apply(labels: np.ndarray, choice: dict | None) -> np.ndarray:
  """`labels` (0/1/2) with the chosen steps applied; the input itself when none is on."""
  choice = choice or {}
  min_size = int(choice.get(MIN_SIZE, 0))
  if not any(choice.get(step, False) for step in STEPS) and min_size <= 0:
    return labels
  labels = labels.copy()
  structure = ndimage.generate_binary_structure(labels.ndim, 1)
  if choice.get("largest_liver_component", False):
    components, n = ndimage.label(labels > 0, structure=structure)
    if n > 1:
      sizes = np.bincount(components.ravel())
      sizes[0] = 0
      labels[components != int(np.argmax(sizes))] = 0
  if choice.get("tumour_inside_liver", False):
    tumours, n = ndimage.label(labels == 2, structure=structure)
    if n:
      near_liver = ndimage.binary_dilation(labels == 1, structure=structure)
      touching = np.zeros(n + 1, bool)
      touching[tumours[near_liver]] = True
      touching[0] = True
      labels[~touching[tumours]] = 0
  if min_size > 0:
    tumours, n = ndimage.label(labels == 2, structure=structure)
    if n:
      small = np.bincount(tumours.ravel()) < min_size
      small[0] = False
      labels[small[tumours]] = 1
  return labels


def _score(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict[str, float]:
  """Liver Dice (mean over volumes; both empty = 1) and tumour Dice pooled over volumes."""
  liver = []
  inter = total = 0
  for pred, ref in zip(preds, refs):
    p, r = pred > 0, ref > 0
    size = int(p.sum()) + int(r.sum())
    liver.append(1.0 if size == 0 else 2.0 * int((p & r).sum()) / size)
    p, r = pred == 2, ref == 2
    inter += int((p & r).sum())
    total += int(p.sum()) + int(r.sum())
  return {"liver_dice": float(np.mean(liver)),
          "tumour_dice": 1.0 if total == 0 else 2.0 * inter / total}


def lesion_score(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict:
  """Lesion recall, precision and F1 over all lesions of the volumes (hit: one voxel)."""
  counts = np.zeros(4, np.int64)   # reference lesions, found; predicted lesions, correct
  for pred, ref in zip(preds, refs):
    det = lesion_detection(pred == 2, ref == 2, (1.0, 1.0, 1.0))["all"]
    counts += (det["ref_count"], det["ref_detected"], det["pred_count"], det["pred_correct"])
  recall = counts[1] / counts[0] if counts[0] else 1.0
  precision = counts[3] / counts[2] if counts[2] else 1.0
  f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
  return {"lesion_recall": float(recall), "lesion_precision": float(precision),
          "lesion_f1": float(f1), "reference_lesions": int(counts[0]),
          "predicted_lesions": int(counts[2])}


def choose(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
           min_sizes: Sequence[int] = MIN_TUMOUR_CANDIDATES) -> dict:
  """The steps to keep, from raw (un-post-processed) predictions of the validation volumes.

  Returns {"choice": {step: value}, "trials": [...], "min_tumour_trials": [...],
  "volumes": n}: each trial names the step, the score without and with it (on top of the
  steps kept before it) and whether it was kept (some score higher, none lower); each
  min-size trial gives a candidate size and its lesion and Dice scores on top of the two
  steps' choice.
  """
  if len(preds) != len(refs) or not preds:
    raise ValueError("choose needs one reference per prediction, and at least one")
  choice = {step: False for step in STEPS}
  current = list(preds)
  base = _score(current, refs)
  trials = []
  for step in STEPS:
    candidate = [apply(p, {step: True}) for p in current]
    score = _score(candidate, refs)
    gains = [score[k] - base[k] for k in base]
    keep = any(g > 0 for g in gains) and not any(g < 0 for g in gains)
    trials.append({"step": step, "without": base, "with": score, "kept": keep})
    if keep:
      choice[step] = True
      current, base = candidate, score
  size_trials = []
  for size in sorted({0, *(int(m) for m in min_sizes)}):
    candidate = [apply(p, {MIN_SIZE: size}) for p in current]
    size_trials.append({MIN_SIZE: size, **lesion_score(candidate, refs),
                        **_score(candidate, refs)})
  best = max(size_trials, key=lambda t: (t["lesion_f1"], -t[MIN_SIZE]))
  choice[MIN_SIZE] = best[MIN_SIZE]
  return {"choice": choice, "trials": trials, "min_tumour_trials": size_trials,
          "volumes": len(preds)}


def save_choice(workdir: str, decision: dict) -> str:
  """Writes `decision` (from `choose`) to WORKDIR/postprocessing.json, atomically."""
  path = os.path.join(workdir, FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(decision, f, indent=1)
  os.replace(tmp, path)
  return path


def load_choice(workdir: str) -> dict | None:
  """The steps chosen for a run (WORKDIR/postprocessing.json), or None when it has none.

  A file written before `min_tumour_voxels` existed reads as 0 (off) for it."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      choice = json.load(f)["choice"]
    if not all(isinstance(choice.get(step), bool) for step in STEPS):
      raise ValueError("a step is missing or not true/false")
    size = choice.get(MIN_SIZE, 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
      raise ValueError(f"{MIN_SIZE} must be a whole number >= 0, got {size!r}")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a post-processing choice ({e})") from e
  return normalise(choice)
