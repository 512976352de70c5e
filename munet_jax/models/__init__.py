"""Network definitions."""

from munet_jax.models.munet import MUNet, ObjectDependentUpsampling, from_config, padding

__all__ = ["MUNet", "ObjectDependentUpsampling", "from_config", "padding"]
