"""MAE random masking by argsort of per-sample noise (docs/methods.md §2)."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Mask(NamedTuple):
  ids_keep: jax.Array     # (B, K) kept patch indices, in the order the encoder sees them
  ids_restore: jax.Array  # (B, L) position of each original patch in the shuffled order
  mask: jax.Array         # (B, L) float, 1 = removed, 0 = kept, in original order


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """int(L * (1 - r)), as the reference (e.g. 49 of 196 at r = 0.75)."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
  return int(num_patches * (1 - mask_ratio))


def mask_from_noise(noise: jax.Array, mask_ratio: float) -> Mask:
  """Keeps the patches with the smallest noise: ids_shuffle = argsort(noise)."""
  chex.assert_rank(noise, 2)
  batch, num_patches = noise.shape
  keep = num_kept(num_patches, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.ones((batch, num_patches), jnp.float32).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return Mask(ids_shuffle[:, :keep], ids_restore, mask)


def random_mask(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Mask:
  """`mask_from_noise` with noise ~ U[0, 1)^(B, L) drawn from `rng`."""
  return mask_from_noise(jax.random.uniform(rng, (batch, num_patches)), mask_ratio)
