"""Image <-> patches and the MAE pixel-reconstruction loss (method.md §2)."""

import chex
import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p*p*C), pixel order (row-in-patch, col-in-patch, channel)."""
  batch, height, width, channels = images.shape
  gh, gw = height // patch_size, width // patch_size
  x = images.reshape(batch, gh, patch_size, gw, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, gh * gw, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images."""
  batch, num_patches, _ = patches.shape
  grid = int(round(num_patches**0.5))
  x = patches.reshape(batch, grid, grid, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid * patch_size, grid * patch_size, channels)


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
