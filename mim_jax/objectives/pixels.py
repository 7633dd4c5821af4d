"""Image <-> patches and the MAE pixel-reconstruction loss (docs/methods.md §2)."""

import chex
import jax
import jax.numpy as jnp

from mim_jax.models.patches import patchify, unpatchify  # pylint: disable=unused-import


def normalized_pixel_target(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch (x - mean) / sqrt(var + eps) with the unbiased variance (PyTorch `var()`)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: jax.Array, target_patches: jax.Array, mask: jax.Array,
             norm_pix: bool = True) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error, in float32."""
  chex.assert_equal_shape([pred, target_patches])
  chex.assert_shape(mask, pred.shape[:2])
  target = target_patches.astype(jnp.float32)
  if norm_pix:
    target = normalized_pixel_target(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)
