"""The label values and the two targets every metric, loss and picture is about.

Labels are uint8: 0 background, 1 liver, 2 tumour (LiTS's convention). The liver target
is labels 1 and 2 together (a tumour lies in the liver), the tumour target label 2. The
functions work on NumPy and JAX arrays alike.
"""

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
