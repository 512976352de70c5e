"""The objects of the permeation study: tumour components and the liver, per axial slice."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from munet_jax.diagnostics.permeation import SENTINEL, object_rates
from munet_jax.preprocessing import intensity_shift, preprocess, shifted
from munet_jax.labels import liver_mask, tumour_mask


def slice_objects(label_slice: np.ndarray, spacing_xy: Sequence[float],
                  small_area_mm2: float) -> list[dict]:
  """The objects of one axial label slice: each tumour component, and the liver.

  Args:
    label_slice: (X, Y) labels 0/1/2.
    spacing_xy: in-plane voxel size (mm).
    small_area_mm2: an object whose area in this slice is below this is small.

  Returns:
    [{"kind": "tumour" | "liver", "mask": (X, Y) bool, "area_mm2", "pixels", "small"}].
    Tumours are 2-D connected components (face connectivity, as `munet_jax.lesions` in
    3-D); the liver is labels 1 and 2 together, one object per slice.
  """
  pixel_mm2 = float(spacing_xy[0]) * float(spacing_xy[1])
  objects = []

  def add(kind, mask):
    pixels = int(mask.sum())
    objects.append({"kind": kind, "mask": mask, "pixels": pixels,
                    "area_mm2": pixels * pixel_mm2,
                    "small": pixels * pixel_mm2 < small_area_mm2})

  components, n = ndimage.label(tumour_mask(label_slice))
  for i in range(1, n + 1):
    add("tumour", components == i)
  liver = liver_mask(label_slice)
  if liver.any():
    add("liver", liver)
  return objects


def _choose_slices(label_ras: np.ndarray, limit: int) -> np.ndarray:
  """Axial slices holding liver or tumour: tumour slices first, each set evenly thinned."""
  tumour = np.flatnonzero(tumour_mask(label_ras).any(axis=(0, 1)))
  liver = np.setdiff1d(np.flatnonzero(liver_mask(label_ras).any(axis=(0, 1))), tumour)

  def thin(idx, k):
    if k <= 0 or idx.size == 0:
      return idx[:0]
    if idx.size <= k:
      return idx
    return idx[np.unique(np.round(np.linspace(0, idx.size - 1, k)).astype(int))]

  chosen = thin(tumour, limit)
  chosen = np.concatenate([chosen, thin(liver, limit - chosen.size)])
  return np.sort(chosen)


def volume_object_rates(variables, config, hu_ras: np.ndarray, label_ras: np.ndarray,
                        spacing: Sequence[float], *, small_area_mm2: float,
                        max_slices: int = 40, pooling: str = "area",
                        batch_size: int = 16) -> tuple[list[dict], list[dict]]:
  """Permeation rates of every object in up to `max_slices` slices of one volume.

  Args:
    variables, config: the model (and its HU window and per-volume HU shift).
    hu_ras, label_ras: (X, Y, Z) Hounsfield units and labels 0/1/2, RAS order.
    spacing: (3,) voxel size (mm), RAS order.
    small_area_mm2, max_slices, pooling, batch_size: see `slice_objects`, `object_rates`.

  Returns:
    (records, slices): one record per object {"slice", "kind", "pixels", "area_mm2",
    "small", "rates": [S-1 floats]}, and per chosen slice {"slice", "objects": [record
    indices]} (for picking a slice to show).
  """
  zs = _choose_slices(label_ras, max_slices)
  if zs.size == 0:
    return [], []
  hu_slices = shifted(np.moveaxis(hu_ras[:, :, zs], -1, 0), intensity_shift(hu_ras, config))
  images = preprocess(hu_slices, config)[..., None]
  records, masks, index, slices = [], [], [], []
  for i, z in enumerate(zs):
    found = slice_objects(label_ras[:, :, z], spacing[:2], small_area_mm2)
    slices.append({"slice": int(z), "objects": list(range(len(records), len(records) + len(found)))})
    for obj in found:
      masks.append(obj.pop("mask"))
      index.append(i)
      records.append({"slice": int(z), **obj})
  rates = object_rates(variables, config, images, np.stack(masks), np.array(index),
                       pooling=pooling, batch_size=batch_size)
  for record, r in zip(records, rates):
    record["rates"] = [float(v) for v in r]
  return records, slices


def summarize_rates(records: Sequence[dict], stages: int) -> dict:
  """Per group and stage: objects, defined rates' mean / std (population) / median, vanished share.

  Groups: 'small' and 'large' (all kinds), and 'tumour_small', 'tumour_large',
  'liver_small', 'liver_large'. Means leave out the SENTINEL values; 'vanished' is the
  share of the group's objects whose rate is SENTINEL at that stage.
  """
  groups = {"small": lambda r: r["small"], "large": lambda r: not r["small"]}
  for kind in ("tumour", "liver"):
    groups[f"{kind}_small"] = lambda r, k=kind: r["kind"] == k and r["small"]
    groups[f"{kind}_large"] = lambda r, k=kind: r["kind"] == k and not r["small"]
  out = {}
  for name, member in groups.items():
    rates = np.array([r["rates"] for r in records if member(r)], np.float64).reshape(-1, stages)
    entry = {"objects": int(len(rates)), "defined": [], "mean": [], "std": [], "median": [],
             "vanished": []}
    for s in range(stages):
      col = rates[:, s]
      ok = col[col != SENTINEL]
      entry["defined"].append(int(ok.size))
      entry["mean"].append(float(ok.mean()) if ok.size else None)
      entry["std"].append(float(ok.std()) if ok.size else None)
      entry["median"].append(float(np.median(ok)) if ok.size else None)
      entry["vanished"].append(float((col == SENTINEL).mean()) if col.size else None)
    out[name] = entry
  return out
