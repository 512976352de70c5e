"""The conventional U-Net of Fig. 1a on LiTS: the lits config with both mU-Net changes off.

The encoder keeps residual learning (`model.residual_learning`, as in lits.py), so the
baseline differs from mU-Net in its skip connections alone; set it False for the
textbook U-Net without encoder residuals.
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location(
      "_lits", os.path.join(os.path.dirname(__file__), "lits.py"))
  lits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lits)
  c = lits.get_config()
  c.model.odu_residual = False       # no object-dependent up-sampling residual path
  c.model.skip_conv = False          # no convolution in the skip connection
  return c
