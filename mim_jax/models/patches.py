"""Images <-> non-overlapping patches (MAE's layout: raster order, pixels (row, col,
channel)) and the patch embedding."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.layers import (PARAM_DTYPE, matmul_last_axis, patch_bias_init,
                                   patch_kernel_init)


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


class PatchProjection(nn.Module):
  """The linear map of each flattened patch (p*p*3 pixels, `patches` order) to a token.

  Its params are those of `nn.Conv(width, (p, p), strides=p)` ('kernel' (p, p, 3,
  width), 'bias'), the layout timm's `patch_embed.proj` converts to, applied as one
  matmul to patches already cut out.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  weight_init: str = "mae"

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    kernel = self.param("kernel", patch_kernel_init(self.weight_init),
                        (self.patch_size, self.patch_size, 3, self.width), PARAM_DTYPE)
    bias = self.param("bias", patch_bias_init(self.weight_init, 3 * self.patch_size**2),
                      (self.width,), PARAM_DTYPE)
    kernel = kernel.reshape(-1, self.width).astype(self.dtype)
    return matmul_last_axis(patches.astype(self.dtype), kernel) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens (B, L, width) in raster order, or (B, K, width)
  for the patches `ids_keep` names, in its order.

  Cutting the kept patches out before projecting them is the same function as
  projecting every patch then dropping the masked ones (each token depends on its
  own patch only) at 1 - mask_ratio of the cost, in the forward and the backward
  pass; for a frozen ViT-B teacher on 224-px images the strided convolution over
  all 196 patches was 5% of a D²-MAE step on the CPU.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  weight_init: str = "mae"

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
    patches = patchify(images, self.patch_size)
    if ids_keep is not None:
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
    return PatchProjection(self.patch_size, self.width, self.dtype, self.weight_init,
                           name="proj")(patches)
