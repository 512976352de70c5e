"""Post-processing of predicted labels, and choosing it on the validation split.

Four optional steps, applied in this order:
  largest_liver_component  keep the largest 6-connected component of liver + tumour;
                           everything else becomes background.
  tumour_inside_liver       tumour components (6-connected) with no liver voxel among
                           their face neighbours become background.
  min_tumour_liver_share    tumour components (6-connected) whose outer faces border liver
                           less often than this share (0-1; 0: off) become background:
                           a lesion lies in the liver, so most of what surrounds it is
                           liver. The share counts the faces between a component's voxels
                           and the non-tumour voxels next to them; those that border
                           liver (label 1) over all of them (a component with no such
                           face has share 1).
  min_tumour_voxels         tumour components (6-connected) of fewer voxels than this
                           become liver (0: off). The liver mask (liver + tumour) does
                           not change; only the tumour call is dropped.
The last two look at the components as they are after the first two; a component that
both would drop becomes background.

A run either fixes them in its config (`eval.largest_liver_component`,
`eval.tumour_inside_liver`, `eval.min_tumour_liver_share`, `eval.min_tumour_voxels`) or,
with `eval.choose_postprocessing`, learns them at the end of training the way nnU-Net
does: the validation volumes are segmented once without post-processing, then each of
the two clean-up steps in turn is tried on top of the steps kept so far and is kept only
when it raises the validation score and lowers none of it (the score: liver Dice, mean
over the volumes; tumour Dice pooled over the volumes). Last, the liver share and the
smallest tumour size are chosen together, among `LIVER_SHARE_CANDIDATES` x
`MIN_TUMOUR_CANDIDATES`, as the pair with the best lesion-wise F1 on the validation
volumes (the harmonic mean of lesion recall and precision, over all their lesions, with
the hit criterion of `munet_jax.lesions`; ties go to the smaller share, then the smaller
size, so both stay off unless dropping components helps). The choice and the numbers
behind it are written to `WORKDIR/postprocessing.json`; `eval.py`, `predict.py` and the
trainer's final evaluation apply it (`load_choice`, `apply`), and the config's values
when a run has no such file.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from munet_jax.errors import UserError
from munet_jax.labels import bounding_box
from munet_jax.lesions import lesion_detection

STEPS = ("largest_liver_component", "tumour_inside_liver")   # on / off
MIN_SIZE = "min_tumour_voxels"                               # a size, 0 = off
LIVER_SHARE = "min_tumour_liver_share"                       # a share in [0, 1], 0 = off
MIN_TUMOUR_CANDIDATES = (0, 2, 4, 8, 16, 32, 64, 128)
LIVER_SHARE_CANDIDATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
FILE = "postprocessing.json"
_FACES = ndimage.generate_binary_structure(3, 1)


def from_config(config) -> dict:
  """The steps a config fixes (`eval.largest_liver_component`, `eval.tumour_inside_liver`,
  `eval.min_tumour_liver_share`, `eval.min_tumour_voxels`)."""
  choice = {step: bool(config.eval[step]) for step in STEPS}
  choice[LIVER_SHARE] = float(config.eval[LIVER_SHARE])
  choice[MIN_SIZE] = int(config.eval[MIN_SIZE])
  return choice


def normalise(choice: dict | None) -> dict:
  """Every step of a choice, with its default (off, 0) where the choice does not name it."""
  choice = choice or {}
  out = {step: bool(choice.get(step, False)) for step in STEPS}
  out[LIVER_SHARE] = float(choice.get(LIVER_SHARE, 0.0))
  out[MIN_SIZE] = int(choice.get(MIN_SIZE, 0))
  return out


def apply(labels: np.ndarray, choice: dict | None) -> np.ndarray:
  """`labels` (0/1/2) with the chosen steps applied; the input itself when none is on."""
  choice = choice or {}
  min_size = int(choice.get(MIN_SIZE, 0))
  min_share = float(choice.get(LIVER_SHARE, 0.0))
  if (not any(choice.get(step, False) for step in STEPS) and min_size <= 0
      and min_share <= 0):
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
  if min_size > 0 or min_share > 0:
    tumours, n = ndimage.label(labels == 2, structure=structure)
    if n:
      sizes = np.bincount(tumours.ravel(), minlength=n + 1)
      outside = np.zeros(n + 1, bool)
      if min_share > 0:
        outside[1:] = liver_share(labels, tumours, n)[1:] < min_share
      small = (sizes < min_size) & ~outside
      small[0] = False
      labels[small[tumours]] = 1
      labels[outside[tumours]] = 0
  return labels


def liver_share(labels: np.ndarray, tumours: np.ndarray, n: int) -> np.ndarray:
  """For tumour components 1..n of `labels` (`tumours`, from `ndimage.label` with face
  connectivity): the share of the faces between a component and the non-tumour voxels
  next to it that border liver (label 1). 1 for a component with no such face. Index 0
  is unused (1)."""
  faces = np.zeros(n + 1, np.int64)
  liver = np.zeros(n + 1, np.int64)
  box = _tumour_box(labels)
  if box is None:
    return np.ones(n + 1)
  labels, tumours = labels[box], tumours[box]
  for axis in range(labels.ndim):
    for here, there in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
      a = tumours[(slice(None),) * axis + (here,)]
      b = labels[(slice(None),) * axis + (there,)]
      border = (a > 0) & (b != 2)
      faces += np.bincount(a[border], minlength=n + 1)
      liver += np.bincount(a[border & (b == 1)], minlength=n + 1)
  return np.where(faces > 0, liver / np.maximum(faces, 1), 1.0)


def _tumour_box(labels: np.ndarray):
  """The bounding box of the tumour voxels grown by one voxel (clipped), or None."""
  box = bounding_box(labels == 2)
  if box is None:
    return None
  return tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)


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
  return _lesion_rates(counts)


def _lesion_rates(counts) -> dict:
  """Recall, precision and F1 from (reference lesions, found, predicted lesions, correct)."""
  recall = counts[1] / counts[0] if counts[0] else 1.0
  precision = counts[3] / counts[2] if counts[2] else 1.0
  f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
  return {"lesion_recall": float(recall), "lesion_precision": float(precision),
          "lesion_f1": float(f1), "reference_lesions": int(counts[0]),
          "predicted_lesions": int(counts[2])}


def _component_table(pred: np.ndarray, ref: np.ndarray) -> dict:
  """What the last two steps need of one validation volume, so that every candidate pair
  is scored without relabelling: per tumour component of `pred` its size, liver share,
  the reference lesions it touches and its overlap with reference tumour and reference
  liver; and the volume's liver and reference-lesion totals."""
  tumours, n = ndimage.label(pred == 2, structure=_FACES)
  lesions, m = ndimage.label(ref == 2, structure=_FACES)
  both = (tumours > 0) & (lesions > 0)
  touches = [set() for _ in range(n + 1)]
  for t, r in set(zip(tumours[both].tolist(), lesions[both].tolist())):
    touches[t].add(r)
  liver_pred, liver_ref = pred > 0, ref > 0
  return {"size": np.bincount(tumours.ravel(), minlength=n + 1)[1:],
          "share": liver_share(pred, tumours, n)[1:],
          "touches": touches[1:],
          "tumour_overlap": np.bincount(tumours[ref == 2], minlength=n + 1)[1:],
          "liver_overlap": np.bincount(tumours[liver_ref], minlength=n + 1)[1:],
          "lesions": m, "ref_tumour": int((ref == 2).sum()),
          "liver_pred": int(liver_pred.sum()), "liver_ref": int(liver_ref.sum()),
          "liver_both": int((liver_pred & liver_ref).sum())}


def _score_pair(tables: Sequence[dict], share: float, size: int) -> dict:
  """`lesion_score` and `_score` of `apply(pred, {LIVER_SHARE: share, MIN_SIZE: size})`,
  from the volumes' component tables."""
  counts = np.zeros(4, np.int64)   # reference lesions, found; predicted lesions, correct
  liver, inter, total = [], 0, 0
  for t in tables:
    outside = t["share"] < share if share > 0 else np.zeros(len(t["size"]), bool)
    kept = ~outside & (t["size"] >= size)
    found = set().union(*(t["touches"][i] for i in np.flatnonzero(kept)))
    correct = sum(1 for i in np.flatnonzero(kept) if t["touches"][i])
    counts += (t["lesions"], len(found), int(kept.sum()), correct)
    pred = t["liver_pred"] - int(t["size"][outside].sum())
    both = t["liver_both"] - int(t["liver_overlap"][outside].sum())
    liver.append(1.0 if pred + t["liver_ref"] == 0 else 2.0 * both / (pred + t["liver_ref"]))
    inter += int(t["tumour_overlap"][kept].sum())
    total += int(t["size"][kept].sum()) + t["ref_tumour"]
  return {**_lesion_rates(counts), "liver_dice": float(np.mean(liver)),
          "tumour_dice": 1.0 if total == 0 else 2.0 * inter / total}


def choose(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
           min_sizes: Sequence[int] = MIN_TUMOUR_CANDIDATES,
           liver_shares: Sequence[float] = LIVER_SHARE_CANDIDATES) -> dict:
  """The steps to keep, from raw (un-post-processed) predictions of the validation volumes.

  Returns {"choice": {step: value}, "trials": [...], "component_trials": [...],
  "volumes": n}: each trial names the step, the score without and with it (on top of the
  steps kept before it) and whether it was kept (some score higher, none lower); each
  component trial gives a candidate liver share and smallest size and their lesion and
  Dice scores on top of the two steps' choice.
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
  tables = [_component_table(p, r) for p, r in zip(current, refs)]
  pairs = [(float(q), int(m)) for q in sorted({0.0, *(float(q) for q in liver_shares)})
           for m in sorted({0, *(int(m) for m in min_sizes)})]
  component_trials = [{LIVER_SHARE: q, MIN_SIZE: m, **_score_pair(tables, q, m)}
                      for q, m in pairs]
  best = max(component_trials, key=lambda t: (t["lesion_f1"], -t[LIVER_SHARE], -t[MIN_SIZE]))
  choice[LIVER_SHARE] = best[LIVER_SHARE]
  choice[MIN_SIZE] = best[MIN_SIZE]
  return {"choice": choice, "trials": trials, "component_trials": component_trials,
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

  A file written before `min_tumour_voxels` or `min_tumour_liver_share` existed reads as
  0 (off) for it."""
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
    share = choice.get(LIVER_SHARE, 0.0)
    if (isinstance(share, bool) or not isinstance(share, (int, float))
        or not 0 <= share <= 1):
      raise ValueError(f"{LIVER_SHARE} must be a number in [0, 1], got {share!r}")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a post-processing choice ({e})") from e
  return normalise(choice)
