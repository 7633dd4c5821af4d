"""mim_jax: masked-image-modeling pre-training of lightweight ViTs in JAX/Flax."""

__version__ = "0.1.0"
