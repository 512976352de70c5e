"""Tumour detection by lesion size: which lesions were found, which predictions were real.

A *lesion* is a connected component of a tumour mask in 3-D. Components use face
connectivity (the 6-neighbourhood, `connectivity=1`) by default, the neighbourhood
the surface definition of `munet_jax.metrics` and medpy's `connectivity=1` use; two tumours that touch
only at an edge or a corner stay two lesions.

A lesion is *small* when its largest axial cross-section is below `small_area_mm2`
(default 28 x 28 = 784 mm^2, the paper's small-object bound):
the network sees axial slices, so the in-plane size of the lesion on its largest slice
is what decides whether it survives the poolings. The area of a slice of a lesion is
its voxel count on that slice times the in-plane voxel area (mm^2).

Matching (a "hit" criterion): a reference lesion is *detected* when at least one voxel
of it is predicted tumour; a predicted lesion is *correct* when at least one voxel of
it is reference tumour. Each lesion is classed by its own size, so precision per class
is over predicted lesions of that size and recall over reference lesions of that size.

Dice per size class c (small or large), from A = reference tumour, B = predicted tumour:
  A_c = the union of the reference lesions of class c;
  B_c = the union of the predicted lesions that overlap some reference lesion of class c,
        together with the predicted lesions of class c that overlap no reference lesion
        (false-positive lesions are charged to their own size class);
  Dice_c = 2 |A_c ∩ B_c| / (|A_c| + |B_c|).
A predicted lesion that overlaps reference lesions of both classes is counted in both
B_small and B_large. For class 'all' these are the whole masks, so Dice_all is the
ordinary tumour Dice. The per-lesion Dice of a reference lesion R is the Dice of R with
the union of the predicted lesions that overlap it (0 when it is missed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from munet_jax.labels import bounding_box

SIZE_CLASSES = ("small", "large", "all")
DEFAULT_SMALL_AREA_MM2 = 28.0 * 28.0


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  labels, n = ndimage.label(mask, structure=structure)
  return labels, int(n)


def _sizes(labels: np.ndarray, n: int, axial_axis: int) -> tuple[np.ndarray, np.ndarray]:
  """Voxel count and largest per-slice voxel count of components 1..n (index 0 unused)."""
  where = np.nonzero(labels)
  ids = labels[where].astype(np.int64)
  z = where[axial_axis].astype(np.int64)
  depth = labels.shape[axial_axis]
  per_slice = np.bincount(ids * depth + z, minlength=(n + 1) * depth).reshape(n + 1, depth)
  return per_slice.sum(axis=1), per_slice.max(axis=1)


def lesion_detection(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                     small_area_mm2: float = DEFAULT_SMALL_AREA_MM2, *, axial_axis: int = 2,
                     connectivity: int = 1) -> dict:
  """Lesion-wise detection and Dice, by lesion size, for one volume.

  Args:
    pred: (X, Y, Z) bool, predicted tumour.
    ref: (X, Y, Z) bool, reference tumour, same shape.
    spacing: voxel size in mm per axis, in the arrays' axis order.
    small_area_mm2: a lesion whose largest axial cross-section is below this is small.
    axial_axis: the axis that indexes axial slices (2 for RAS arrays).
    connectivity: 1 face (6-neighbourhood), 2 face+edge (18), 3 full (26) in 3-D.

  Returns:
    {"small_area_mm2": float, "connectivity": int,
     "small" | "large" | "all": {"ref_count", "ref_detected", "pred_count", "pred_correct",
        "recall", "precision", "dice", "intersection", "ref_voxels", "pred_voxels"},
     "reference": [{"max_area_mm2", "volume_mm3", "small", "detected", "dice"}, ...]}
    recall / precision / dice are None where undefined (no lesion of that class in the
    reference / prediction / either); counts are in voxels.
  """
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
  spacing = tuple(float(s) for s in spacing)
  pixel_mm2 = float(np.prod([s for i, s in enumerate(spacing) if i != axial_axis]))
  voxel_mm3 = float(np.prod(spacing))

  # Work inside the bounding box of both masks: labelling is the cost, and tumours are
  # a small part of a CT volume.
  box = bounding_box(pred | ref)
  if box is not None:
    pred, ref = pred[box], ref[box]
  ref_lab, n_ref = _components(ref, connectivity)
  pred_lab, n_pred = _components(pred, connectivity)
  ref_size, ref_area = _sizes(ref_lab, n_ref, axial_axis)
  pred_size, pred_area = _sizes(pred_lab, n_pred, axial_axis)
  ref_small = ref_area * pixel_mm2 < small_area_mm2
  pred_small = pred_area * pixel_mm2 < small_area_mm2

  # Overlap of every (reference lesion, predicted lesion) pair that shares voxels.
  both = (ref_lab > 0) & (pred_lab > 0)
  pair_keys, pair_voxels = np.unique(ref_lab[both].astype(np.int64) * (n_pred + 1)
                                     + pred_lab[both], return_counts=True)
  pair_ref, pair_pred = pair_keys // (n_pred + 1), pair_keys % (n_pred + 1)
  ref_hit = np.zeros(n_ref + 1, bool)
  ref_hit[pair_ref] = True
  pred_hit = np.zeros(n_pred + 1, bool)
  pred_hit[pair_pred] = True

  out = {"small_area_mm2": float(small_area_mm2), "connectivity": int(connectivity)}
  r_ids, p_ids = np.arange(1, n_ref + 1), np.arange(1, n_pred + 1)
  for size in SIZE_CLASSES:
    if size == "all":
      refs = np.ones(n_ref + 1, bool)
      preds_own = np.ones(n_pred + 1, bool)
    else:
      refs = ref_small if size == "small" else ~ref_small
      preds_own = pred_small if size == "small" else ~pred_small
    refs = refs.copy()
    refs[0] = False
    preds_own = preds_own.copy()
    preds_own[0] = False
    # B_c: predicted lesions matched to a class-c reference lesion, plus unmatched
    # predicted lesions of class c.
    in_b = np.zeros(n_pred + 1, bool)
    in_b[pair_pred[refs[pair_ref]]] = True
    in_b |= preds_own & ~pred_hit
    intersection = int(pair_voxels[refs[pair_ref]].sum())
    ref_voxels = int(ref_size[refs].sum())
    pred_voxels = int(pred_size[in_b].sum())
    ref_count = int(refs[r_ids].sum())
    pred_count = int(preds_own[p_ids].sum())
    detected = int((refs & ref_hit)[r_ids].sum())
    correct = int((preds_own & pred_hit)[p_ids].sum())
    out[size] = {
        "ref_count": ref_count, "ref_detected": detected,
        "pred_count": pred_count, "pred_correct": correct,
        "recall": detected / ref_count if ref_count else None,
        "precision": correct / pred_count if pred_count else None,
        "dice": (2.0 * intersection / (ref_voxels + pred_voxels)
                 if ref_voxels + pred_voxels else None),
        "intersection": intersection, "ref_voxels": ref_voxels, "pred_voxels": pred_voxels,
    }

  matched_pred_voxels = np.zeros(n_ref + 1, np.int64)
  np.add.at(matched_pred_voxels, pair_ref, pred_size[pair_pred])
  overlap = np.zeros(n_ref + 1, np.int64)
  np.add.at(overlap, pair_ref, pair_voxels)
  out["reference"] = [
      {"max_area_mm2": float(ref_area[i] * pixel_mm2), "volume_mm3": float(ref_size[i] * voxel_mm3),
       "small": bool(ref_small[i]), "detected": bool(ref_hit[i]),
       "dice": float(2.0 * overlap[i] / (ref_size[i] + matched_pred_voxels[i]))}
      for i in r_ids]
  return out
