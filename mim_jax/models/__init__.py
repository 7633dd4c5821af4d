"""Flax Linen models: backbones by name (`registry`), the ViT encoder and the MAE decoder."""

from mim_jax.models.mae import MaskedAutoencoder
from mim_jax.models.vit import VARIANTS, VisionTransformer

__all__ = ["MaskedAutoencoder", "VisionTransformer", "VARIANTS"]
