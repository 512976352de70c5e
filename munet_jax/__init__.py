"""munet-jax: mU-Net for liver and liver-tumour segmentation in CT, in JAX/Flax.

The public API:
  init(rng, config) -> variables
  apply(variables, images, config, train=False) -> logits (N, H, W, num_classes)
  preprocess(hu, config=None) -> the HU window and scaling of the config
  load(workdir, which="latest") -> (config, variables) from a training run's checkpoint
  metrics.segmentation_metrics(pred, ref, spacing, nsd_tolerance=2.0)
      -> DSC, VOE, RVD, ASSD, MSSD, RMSD, HD95, NSD

Attributes are imported on first use, so that command-line tools which never touch JAX
(the data checker, the converters) start quickly.
"""

import importlib

from munet_jax._xla_cpu import prefer_threaded_convolutions

# Before JAX creates its CPU backend: multi-threaded convolutions (see munet_jax/_xla_cpu.py).
prefer_threaded_convolutions()

__version__ = "0.1.0"
__all__ = ["apply", "base_config", "init", "load", "metrics", "permeation_rate", "preprocess"]

_LAZY = {
    "apply": ("munet_jax.api", "apply"),
    "init": ("munet_jax.api", "init"),
    "load": ("munet_jax.api", "load"),
    "base_config": ("munet_jax.config", "base_config"),
    "permeation_rate": ("munet_jax.diagnostics", "permeation_rate"),
    "preprocess": ("munet_jax.preprocessing", "preprocess"),
}


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  if name == "metrics":
    return importlib.import_module("munet_jax.metrics")
  raise AttributeError(f"module 'munet_jax' has no attribute '{name}'")
