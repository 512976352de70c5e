"""The label values and the two targets every metric, loss and picture is about.

Labels are uint8: 0 background, 1 liver, 2 tumour (LiTS's convention). The liver target
is labels 1 and 2 together (a tumour lies in the liver), the tumour target label 2. The
mask functions work on NumPy and JAX arrays alike.
"""

import numpy as np

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
NUM_CLASSES = 3


def liver_mask(labels):
  """True on liver voxels, tumours included (labels 1 and 2)."""
  return labels > BACKGROUND


def tumour_mask(labels):
  """True on tumour voxels (label 2)."""
  return labels == TUMOUR


# The targets, by the names results.json gives them (its keys keep the spelling "tumor").
TARGETS = {"liver": liver_mask, "tumor": tumour_mask}


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
  """The smallest box holding every True voxel, or None for an empty mask."""
  if mask.size == 0:
    return None
  m = np.ascontiguousarray(mask).view(np.uint8)
  rows = m.reshape(m.shape[0], -1).max(axis=1)   # one streaming pass each, no temporaries
  rest = m.max(axis=0)                            # of the volume's size
  hits = [np.flatnonzero(rows)]
  for axis in range(rest.ndim):
    other = tuple(i for i in range(rest.ndim) if i != axis)
    hits.append(np.flatnonzero(rest.max(axis=other) if other else rest))
  if hits[0].size == 0:
    return None
  return tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)
