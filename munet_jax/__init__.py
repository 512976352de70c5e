"""munet-jax: mU-Net for liver and liver-tumour segmentation in CT, in JAX/Flax.

The public API (SPEC.md):
  init(rng, config) -> variables
  apply(variables, images, config, train=False) -> logits (N, H, W, num_classes)
  preprocess(hu, config=None) -> the HU window and scaling of the config
  metrics.segmentation_metrics(pred, ref, spacing) -> dict of DSC, VOE, RVD, ASSD, MSSD, RMSD
"""

from munet_jax.config import base_config
from munet_jax.preprocessing import preprocess

__all__ = ["base_config", "preprocess"]
__version__ = "0.1.0"
