"""Intensity preprocessing: the HU window and scaling of section II.E, nothing else."""

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
