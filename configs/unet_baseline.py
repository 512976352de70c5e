"""The conventional U-Net of Fig. 1a on LiTS: the paper's recipe with both mU-Net changes off.

The encoder keeps residual learning (`model.residual_learning`, as in lits.py), so the
baseline differs from mU-Net in its skip connections alone; set it False for the
textbook U-Net without encoder residuals.
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()                  # the recipe of lits.py
  c.data.root = "data/lits"
  c.model.odu_residual = False       # no object-dependent up-sampling residual path
  c.model.skip_conv = False          # no convolution in the skip connection
  return c
