"""SimMIM's random masking of coarse "mask patches", repeated to the model's patch grid.

The reference is `MaskGenerator` in microsoft/SimMIM `data/data_simmim.py`, called by
the data loader's `SimMIMTransform` once per image:

  rand_size  = input_size // mask_patch_size        (g: the mask-patch grid side)
  scale      = mask_patch_size // model_patch_size
  mask_count = int(np.ceil(g * g * mask_ratio))     (float64; 49 * 0.6 -> 30)
  mask_idx   = np.random.permutation(g * g)[:mask_count]; mask[mask_idx] = 1
  mask.reshape(g, g).repeat(scale, axis=0).repeat(scale, axis=1)   -> (g*scale, g*scale)

with both divisions asserted exact. Settings: `mask_patch_size=32`, `mask_ratio=0.6`;
ViT-B (`configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml`)
224 px with 16 px patches (g = 7, scale = 2, 30 of 49 masked); Swin-B at 192 px with
4 px patches (g = 6, scale = 8, 22 of 36).

Two ways to draw it, the same distribution and, for the same permutation, the same
mask: `mask_patches_from_noise` on the device (the `mask_count` patches with the
smallest of g*g i.i.d. noise values, i.e. the first `mask_count` of the uniformly
random permutation argsort(noise), as MAE's `mim_jax.masking`), and `MaskPatchMasker`
in the data workers (a `WorkerField`, with the reference's `permutation`).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.errors import ConfigError


def _check_ratio(mask_ratio: float) -> None:
  if not 0.0 < mask_ratio < 1.0:
    raise ConfigError(f"SimMIM mask_ratio={mask_ratio!r} must be in (0, 1)")


def mask_count(grid: int, mask_ratio: float) -> int:
  """int(ceil(g * g * ratio)) in float64, as the reference (30 of 49 at 0.6)."""
  _check_ratio(mask_ratio)
  return int(np.ceil(grid * grid * mask_ratio))


def upsample(mask: jax.Array | np.ndarray, scale: int) -> jax.Array | np.ndarray:
  """(..., g, g) -> (..., g*scale, g*scale): each mask patch as a scale x scale block."""
  xp = jnp if isinstance(mask, jax.Array) else np
  return xp.repeat(xp.repeat(mask, scale, axis=-2), scale, axis=-1)


def mask_patches_from_noise(noise: jax.Array, *, mask_ratio: float, scale: int) -> jax.Array:
  """Masks the `mask_count` mask patches of smallest noise; float (B, g*scale, g*scale).

  Args:
    noise: (B, g * g) per-example noise over the mask-patch grid in raster order.
    mask_ratio: fraction of mask patches to mask (rounded up, as the reference).
    scale: model patches per mask-patch side (mask_patch_size // model_patch_size).

  Returns:
    1.0 = masked, 0.0 = visible, over the model's patch grid in raster order.
  """
  chex.assert_rank(noise, 2)
  batch, length = noise.shape
  grid = math.isqrt(length)
  if grid * grid != length:
    raise ConfigError(f"SimMIM mask noise needs a square mask-patch grid, got {length} values")
  if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ConfigError(f"SimMIM mask scale={scale!r} must be an integer >= 1")
  count = mask_count(grid, mask_ratio)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # position in the permutation
  mask = (rank < count).astype(jnp.float32).reshape(batch, grid, grid)
  return upsample(mask, scale)


def random_mask_patches(rng: jax.Array, batch: int, *, grid: int, mask_ratio: float,
                        scale: int) -> jax.Array:
  """`mask_patches_from_noise` with noise ~ U[0, 1)^(B, g*g) drawn from `rng`."""
  noise = jax.random.uniform(rng, (batch, grid * grid))
  return mask_patches_from_noise(noise, mask_ratio=mask_ratio, scale=scale)


@dataclasses.dataclass(frozen=True)
class MaskPatchMasker:
  """SimMIM's `MaskGenerator` as a `WorkerField`: `make(rng)` -> bool (G, G), G = g * scale.

  Attributes:
    input_size: image side in pixels.
    mask_patch_size: side of one mask patch in pixels (32).
    model_patch_size: the model's patch side in pixels (16 for ViT).
    mask_ratio: fraction of mask patches masked, rounded up (0.6).
    name: the batch key of the mask.
  """
  input_size: int = 224
  mask_patch_size: int = 32
  model_patch_size: int = 16
  mask_ratio: float = 0.6
  name: str = "token_mask"

  def __post_init__(self):
    for field in ("input_size", "mask_patch_size", "model_patch_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"SimMIM {field}={value!r} must be an integer >= 1")
    if self.input_size % self.mask_patch_size:
      raise ConfigError(f"SimMIM mask_patch_size={self.mask_patch_size} must divide "
                        f"input_size={self.input_size}")
    if self.mask_patch_size % self.model_patch_size:
      raise ConfigError(f"SimMIM model_patch_size={self.model_patch_size} must divide "
                        f"mask_patch_size={self.mask_patch_size}")
    _check_ratio(self.mask_ratio)

  @property
  def grid(self) -> int:
    """g: mask patches per side (the reference's `rand_size`)."""
    return self.input_size // self.mask_patch_size

  @property
  def scale(self) -> int:
    return self.mask_patch_size // self.model_patch_size

  @property
  def count(self) -> int:
    return mask_count(self.grid, self.mask_ratio)

  def make(self, rng: np.random.Generator) -> np.ndarray:
    """One example's mask over the model's patch grid, True = masked."""
    tokens = self.grid * self.grid
    mask = np.zeros(tokens, dtype=bool)
    mask[rng.permutation(tokens)[:self.count]] = True
    return upsample(mask.reshape(self.grid, self.grid), self.scale)
