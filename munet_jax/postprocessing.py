"""Post-processing of predicted labels, and choosing it on the validation split.

Two optional steps, applied in this order:
  largest_liver_component  keep the largest 6-connected component of liver + tumour;
                           everything else becomes background.
  tumour_inside_liver       tumour components (6-connected) with no liver voxel among
                           their face neighbours become background.

A run either fixes them in its config (`eval.largest_liver_component`,
`eval.tumour_inside_liver`) or, with `eval.choose_postprocessing`, learns them at the end
of training the way nnU-Net does: the validation volumes are segmented once without
post-processing, then each step in turn is tried on top of the steps kept so far and is
kept only when it raises the validation score and lowers none of it (the score: liver
Dice, mean over the volumes; tumour Dice pooled over the volumes). The choice and the
numbers behind it are written to `WORKDIR/postprocessing.json`; `eval.py`, `predict.py`
and the trainer's final evaluation apply it (`load_choice`, `apply`), and the config's
flags when a run has no such file.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from munet_jax.errors import UserError

STEPS = ("largest_liver_component", "tumour_inside_liver")
FILE = "postprocessing.json"
_FACES = ndimage.generate_binary_structure(3, 1)


def from_config(config) -> dict[str, bool]:
  """The steps a config fixes (`eval.largest_liver_component`, `eval.tumour_inside_liver`)."""
  return {step: bool(config.eval[step]) for step in STEPS}


def apply(labels: np.ndarray, choice: dict[str, bool] | None) -> np.ndarray:
  """`labels` (0/1/2) with the chosen steps applied; the input itself when none is on."""
  choice = choice or {}
  if not any(choice.get(step, False) for step in STEPS):
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


def choose(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict:
  """The steps to keep, from raw (un-post-processed) predictions of the validation volumes.

  Returns {"choice": {step: bool}, "trials": [...], "volumes": n}: each trial names the
  step, the score without and with it (on top of the steps kept before it) and whether
  it was kept (some score higher, none lower).
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
  return {"choice": choice, "trials": trials, "volumes": len(preds)}


def save_choice(workdir: str, decision: dict) -> str:
  """Writes `decision` (from `choose`) to WORKDIR/postprocessing.json, atomically."""
  path = os.path.join(workdir, FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(decision, f, indent=1)
  os.replace(tmp, path)
  return path


def load_choice(workdir: str) -> dict[str, bool] | None:
  """The steps chosen for a run (WORKDIR/postprocessing.json), or None when it has none."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      choice = json.load(f)["choice"]
    if not all(isinstance(choice.get(step), bool) for step in STEPS):
      raise ValueError("a step is missing or not true/false")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a post-processing choice ({e})") from e
  return {step: choice[step] for step in STEPS}
