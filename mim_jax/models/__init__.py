"""Flax Linen models: the ViT encoder and the MAE decoder."""

from mim_jax.models.mae import MaskedAutoencoder
from mim_jax.models.vit import VARIANTS, VisionTransformer, encoder_kwargs

__all__ = ["MaskedAutoencoder", "VisionTransformer", "VARIANTS", "encoder_kwargs"]
