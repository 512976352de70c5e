"""munet-jax: mU-Net for liver and liver-tumour segmentation in CT, in JAX/Flax.

The public API (SPEC.md):
  init(rng, config) -> variables
  apply(variables, images, config, train=False) -> logits (N, H, W, num_classes)
  preprocess(hu, config=None) -> the HU window and scaling of the config
"""

from munet_jax.api import apply, init
from munet_jax.config import base_config
from munet_jax.preprocessing import preprocess

__all__ = ["apply", "base_config", "init", "preprocess"]
__version__ = "0.1.0"
