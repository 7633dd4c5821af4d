"""Images <-> non-overlapping patches, MAE's layout: raster order, pixels (row, col, channel)."""

import jax


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
