"""Intensity preprocessing: the HU window and scaling of section II.E, and an optional
per-volume shift of the HU scale (`data.reference_hu`, off in the paper's recipe)."""

from __future__ import annotations

import ml_collections
import numpy as np

from munet_jax.config import base_config


def preprocess(hu, config: ml_collections.ConfigDict | None = None):
  """Clips Hounsfield units to `data.hu_window` and maps it linearly onto `data.scaled_range`.

  Args:
    hu: CT intensities in HU, any shape (numpy or jax).
    config: an experiment config; the paper's [-250, 250] -> [-1, 1] when None.

  Returns:
    float32 array of the same shape and kind (numpy in, numpy out).
  """
  if config is None:
    config = base_config()
  lo, hi = (float(v) for v in config.data.hu_window)
  out_lo, out_hi = (float(v) for v in config.data.scaled_range)
  if isinstance(hu, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # only for JAX inputs: numpy callers need not import JAX
  x = xp.clip(xp.asarray(hu, dtype=xp.float32), lo, hi)
  return ((x - lo) * ((out_hi - out_lo) / (hi - lo)) + out_lo).astype(xp.float32)


def reference_intensity(hu, window, percentile: float) -> float | None:
  """The `percentile` (numpy's linear interpolation) of a volume's voxels inside `window`.

  Voxels are taken as the slice store keeps them (rounded to whole HU, clipped to int16),
  so a volume gives the same value whether it is read from its file or from the store,
  in any axis order. None when no voxel lies inside the window.

  Args:
    hu: a volume in HU (numpy, any shape and dtype).
    window: (low, high), inclusive, in HU.
    percentile: in [0, 100].
  """
  hu = np.asarray(hu)
  lo, hi = int(np.ceil(window[0])), int(np.floor(window[1]))
  if hi < lo:
    return None
  counts = np.zeros(hi - lo + 1, np.int64)
  # A few million voxels at a time, along the last axis: bounds the temporaries, and a
  # memory-mapped volume is read in pieces rather than copied whole.
  if hu.ndim == 0:
    hu = hu.reshape(1)
  plane = max(1, hu.size // max(hu.shape[-1], 1))
  step = max(1, (1 << 22) // plane)
  for start in range(0, hu.shape[-1], step):
    v = hu[..., start:start + step].reshape(-1)
    if v.dtype.kind == "f":
      v = np.rint(v)
    v = np.clip(v, np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int32)
    v = v[(v >= lo) & (v <= hi)]
    counts += np.bincount(v - lo, minlength=counts.size)
  n = int(counts.sum())
  if n == 0:
    return None
  position = percentile / 100.0 * (n - 1)
  k = int(np.floor(position))
  ends = np.cumsum(counts)                 # sorted order: value lo+i fills [ends[i-1], ends[i])
  below = lo + int(np.searchsorted(ends, k, side="right"))
  above = lo + int(np.searchsorted(ends, min(k + 1, n - 1), side="right"))
  return below + (position - k) * (above - below)


def intensity_shift(hu, config: ml_collections.ConfigDict) -> int:
  """The whole number of HU added to every voxel of a volume before the window.

  With `data.reference_hu` set, the shift that brings the volume's
  `data.reference_percentile` of the voxels within `data.reference_window` (its soft
  tissue) to `data.reference_hu`, rounded; this evens out how bright the liver is from
  scan to scan (plain against contrast-enhanced phases). 0 when `data.reference_hu` is
  None (the paper's recipe) or no voxel lies in the window.
  """
  target = config.data.get("reference_hu")
  if target is None:
    return 0
  value = reference_intensity(hu, tuple(config.data.reference_window),
                              float(config.data.reference_percentile))
  return 0 if value is None else int(np.rint(float(target) - value))


def shifted(hu: np.ndarray, shift: int) -> np.ndarray:
  """`hu + shift` in hu's dtype (int16 clipped to its range); `hu` itself when shift is 0."""
  if shift == 0:
    return hu
  if hu.dtype.kind in "iu":
    info = np.iinfo(hu.dtype)
    return np.clip(hu.astype(np.int32) + shift, info.min, info.max).astype(hu.dtype)
  return hu + np.asarray(shift, hu.dtype)
