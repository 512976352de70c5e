"""Network definitions."""

from munet_jax.models.munet import MUNet, ObjectDependentUpsampling, from_config, padding, pooling_factor

__all__ = ["MUNet", "ObjectDependentUpsampling", "from_config", "padding", "pooling_factor"]
