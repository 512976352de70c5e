"""Overlay pictures in the manner of the paper's Fig. 10: CT, reference and prediction.

One PNG per chosen axial slice of a case, two panels (liver, tumour). Each panel shows
the CT in the HU window, the reference contour (green) and the predicted contour
(yellow), false positives (predicted, not in the reference) filled red and false
negatives (in the reference, missed) filled blue. Slices are shown as radiologists
read them: anterior at the top, the patient's right on the viewer's left, with the
true in-plane aspect ratio.

Matplotlib's Agg canvas is used directly (no pyplot), so nothing needs a display and
no global backend is switched.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from munet_jax.atomic import write_png
from munet_jax.labels import liver_mask, tumour_mask

REFERENCE_COLOUR = "#33dd33"
PREDICTION_COLOUR = "#ffdd00"
FALSE_POSITIVE = (1.0, 0.15, 0.15, 0.5)
FALSE_NEGATIVE = (0.2, 0.45, 1.0, 0.5)
TARGETS = (("liver", liver_mask), ("tumour", tumour_mask))


def choose_slices(pred: np.ndarray, ref: np.ndarray, n: int) -> list[tuple[int, str]]:
  """Up to `n` axial slices worth looking at, each with the reason it was chosen.

  In order: the slice with the largest reference tumour area ('tumour'; the largest
  predicted tumour when the reference has none), the slice with the most wrongly
  labelled voxels ('error'), the slice with the largest reference liver area ('liver'),
  then slices evenly spaced over the reference liver's extent ('even'; over the whole
  volume when there is no liver), each as far as possible from those already chosen.
  No slice is chosen twice; fewer than `n` come back when the extent has no more.

  Args:
    pred, ref: (X, Y, Z) labels 0/1/2, slices along the last axis.
    n: how many slices at most.
  """
  z = ref.shape[2]
  chosen: list[tuple[int, str]] = []

  def add(index, reason):
    index = int(index)
    if len(chosen) < n and all(index != c for c, _ in chosen):
      chosen.append((index, reason))

  area = lambda mask: mask.sum(axis=(0, 1))
  tumour = area(tumour_mask(ref))
  if tumour.any():
    add(np.argmax(tumour), "tumour")
  elif (pred_tumour := area(tumour_mask(pred))).any():
    add(np.argmax(pred_tumour), "tumour")
  errors = area(pred != ref)
  if errors.any():
    add(np.argmax(errors), "error")
  liver = area(liver_mask(ref))
  if liver.any():
    add(np.argmax(liver), "liver")
    lo, hi = np.flatnonzero(liver)[[0, -1]]
  else:
    lo, hi = 0, z - 1
  # Then spread: each next slice as far as possible from those already chosen.
  candidates = np.arange(lo, hi + 1)
  while len(chosen) < n:
    taken = np.array([c for c, _ in chosen], int)
    free = candidates[~np.isin(candidates, taken)]
    if free.size == 0:
      break
    if taken.size:
      gap = np.min(np.abs(free[:, None] - taken[None, :]), axis=1)
      add(free[np.argmax(gap)], "even")
    else:
      add((lo + hi) // 2, "even")
  return chosen


def display(slice_xy: np.ndarray) -> np.ndarray:
  """A RAS (X, Y) slice as an image: rows anterior -> posterior, columns right -> left."""
  return slice_xy[::-1, ::-1].T


def _dice(p: np.ndarray, r: np.ndarray) -> float | None:
  total = int(p.sum() + r.sum())
  return None if total == 0 else 2.0 * float((p & r).sum()) / total


def render_slice(path: str, hu_slice: np.ndarray | None, pred_slice: np.ndarray,
                 ref_slice: np.ndarray, spacing_xy: Sequence[float], title: str,
                 window: Sequence[float] = (-250.0, 250.0)) -> None:
  """Writes one overlay PNG atomically.

  Args:
    path: the .png file.
    hu_slice: (X, Y) Hounsfield units of a RAS axial slice, or None (black background).
    pred_slice, ref_slice: (X, Y) labels 0/1/2.
    spacing_xy: in-plane voxel size (mm) along X and Y.
    title: the figure's title.
    window: HU shown from black to white.
  """

  x, y = ref_slice.shape
  aspect = float(spacing_xy[1]) / float(spacing_xy[0])  # row height over column width
  width = 4.0 * 2
  height = max(2.5, 4.0 * (y * spacing_xy[1]) / max(x * spacing_xy[0], 1e-9)) + 0.9
  fig = Figure(figsize=(width, min(height, 12.0)), dpi=110)
  axes = fig.subplots(1, 2)
  ct = (np.zeros((y, x)) if hu_slice is None else
        display(np.clip(hu_slice.astype(np.float32), window[0], window[1])))
  for ax, (name, select) in zip(axes, TARGETS):
    p, r = select(pred_slice), select(ref_slice)
    ax.imshow(ct, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect,
              interpolation="nearest")
    colours = np.zeros((y, x, 4))
    colours[display(p & ~r)] = FALSE_POSITIVE
    colours[display(r & ~p)] = FALSE_NEGATIVE
    ax.imshow(colours, aspect=aspect, interpolation="nearest")
    for mask, colour in ((r, REFERENCE_COLOUR), (p, PREDICTION_COLOUR)):
      if mask.any() and not mask.all():
        ax.contour(display(mask).astype(np.float32), levels=[0.5], colors=[colour],
                   linewidths=1.0)
    dice = _dice(p, r)
    ax.set_title(f"{name}: slice DSC " + ("-" if dice is None else f"{100 * dice:.1f} %"),
                 fontsize=9)
    ax.set_axis_off()
  handles = [Line2D([], [], color=REFERENCE_COLOUR, label="reference"),
             Line2D([], [], color=PREDICTION_COLOUR, label="prediction"),
             Patch(color=FALSE_POSITIVE, label="false positive"),
             Patch(color=FALSE_NEGATIVE, label="false negative")]
  fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
  fig.suptitle(title + ("" if hu_slice is not None else " (no CT given)"), fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 0.95))
  write_png(fig, path)


def write_case_overlays(folder: str, case: str, hu: np.ndarray | None, pred: np.ndarray,
                        ref: np.ndarray, spacing: Sequence[float], n: int,
                        window: Sequence[float] = (-250.0, 250.0)) -> list[str]:
  """Overlay PNGs for up to `n` chosen slices of one case (see `choose_slices`).

  Args:
    folder: where the PNGs go, named CASE_zINDEX_REASON.png.
    case: the case name.
    hu: (X, Y, Z) Hounsfield units in RAS order, or None.
    pred, ref: (X, Y, Z) labels 0/1/2 in RAS order.
    spacing: (3,) voxel size in mm, RAS order.
    n: slices per case.
    window: HU window of the pictures.

  Returns:
    The files written.
  """
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", case)
  paths = []
  for index, reason in choose_slices(pred, ref, n):
    path = os.path.join(folder, f"{safe}_z{index:03d}_{reason}.png")
    render_slice(path, None if hu is None else hu[:, :, index], pred[:, :, index],
                 ref[:, :, index], spacing[:2],
                 f"{case}, axial slice {index} ({reason})", window)
    paths.append(path)
  return paths
