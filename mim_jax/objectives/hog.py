"""MaskFeat's HOG targets (Wei et al. 2022), computed as the reference code computes them.

The reference is `HOGLayerC` in facebookresearch/SlowFast `slowfast/models/operators.py`,
called for images by `MaskMViT` (`slowfast/models/masked.py`, `PRED_HOG: True`, config
`configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml`) as `HOGLayerC(nbins=9, pool=8)`:
9 orientation bins, 8x8-pixel cells and `gaussian_window=0`, i.e. NO Gaussian
weighting. (mmselfsup / mmpretrain's MaskFeat port uses `gaussian_window=16`; it is
available here as `gaussian_window=16`.) Per image and colour channel, in float32:

  1. reflect-pad by one pixel (`F.pad(mode="reflect")`, the edge pixel not repeated);
  2. gx = cross-correlation with [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (left minus
     right), gy = with its transpose [[1, 2, 1], [0, 0, 0], [-1, -2, -1]] (top minus
     bottom), per channel (`groups=3`);
  3. magnitude sqrt(gx^2 + gy^2); phase = atan2(gx, gy) / pi * nbins in [-9, 9] (note
     the argument order: gx is atan2's first argument);
  4. with a Gaussian window of size k: the magnitude times get_gkern(k, k // 2)
     (a normalised outer product of exp(-((i - (k-1)/2) / (k//2))^2 / 2)), the kernel
     tiled over the image;
  5. each pixel's magnitude added to bin floor(phase) mod nbins (`scatter_add_` with
     `phase.floor().long() % nbins`, Python-style modulo: -1 -> 8, and phase = +-9 -> 0);
  6. bins summed over each 8x8 cell (`unfold` + `sum`), then each (channel, cell)
     histogram divided by max(||h||_2, 1e-12) (`F.normalize(p=2, dim=bins)`).

`MaskMViT._get_hog_label_2d` then makes one patch's target from the (B, 3, 9, H/8, W/8)
histograms with `flatten(1, 2)`, `permute(0, 2, 3, 1)` and two `unfold`s: a patch of
(p/8)^2 cells gives 3 * 9 * (p/8)^2 values (108 for 16x16 patches) in the order
(channel, bin, cell row, cell column), patches in raster order.

Input. The reference computes HOG on the network input: the crop normalised with the
ImageNet mean and std. In exact arithmetic the result does not depend on that
normalisation: the gradient kernels sum to zero and reflect padding keeps a constant
offset constant, so a per-channel offset cancels, and a per-channel positive scale
multiplies every magnitude of a (channel, cell) histogram alike, which the L2
normalisation removes. It matters through float rounding, and on 8-bit images it
matters: a pixel whose exact gradient has gx = 0 and gy != 0 sits on a bin edge
(phase 0 or +-9), and the rounding of the normalised values sends it to bin 0 or 8
(1.8 % of the pixels of three 224 px photos, in 55 % of the cells; targets move by up
to 0.24). PyTorch's CPU conv2d also leaves ~1e-7 residues in flat regions, which the
L2 normalisation turns into arbitrary unit histograms (flat differences are exactly
zero here). Given the raw pixel values (uint8, or their values as floats) the
gradients are exact integers and every bin is that of the exact maths, the same on
every backend: pass the uint8 crop. Given normalised pixels, the result is the
reference's up to those bin-edge pixels.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.errors import ConfigError

NBINS = 9
CELL_SIZE = 8


def gaussian_window_kernel(size: int) -> np.ndarray:
  """SlowFast's `get_gkern(size, size // 2)`: a (size, size) float32 kernel summing to 1."""
  n = np.arange(size, dtype=np.float32)
  n = (n - n.mean()) / np.float32(size // 2)
  window = np.exp(np.float32(-0.5) * n * n)
  kernel = np.outer(window, window)
  return (kernel / kernel.sum()).astype(np.float32)


def _check_geometry(height: int, width: int, cell_size: int, gaussian_window: int) -> None:
  if cell_size < 1 or height % cell_size or width % cell_size:
    raise ConfigError(f"HOG cells of {cell_size} px must tile the {height}x{width} image: "
                      "use an image size divisible by the cell size")
  if gaussian_window and (height % gaussian_window or width % gaussian_window):
    raise ConfigError(f"HOG gaussian_window={gaussian_window} must tile the {height}x{width} "
                      "image: use 0 (the SlowFast MaskFeat setting) or a divisor of the size")


def hog_cells(images: jax.Array, *, nbins: int = NBINS, cell_size: int = CELL_SIZE,
              gaussian_window: int = 0) -> jax.Array:
  """L2-normalised orientation histograms of every cell and colour channel.

  Args:
    images: (B, H, W, 3) pixels, any real dtype (computed in float32); raw or
      normalised (see the module docstring).
    nbins: orientation bins, each 180 / nbins degrees of unsigned orientation
      (the modulo of step 5 folds opposite gradient directions together).
    cell_size: cell side in pixels (the reference's `pool`).
    gaussian_window: side of the tiled Gaussian magnitude window; 0 = none.

  Returns:
    (B, H / cell_size, W / cell_size, 3, nbins) float32: the reference's
    (B, 3, nbins, H/8, W/8) output with the channel and bin axes moved last.
  """
  chex.assert_rank(images, 4)
  batch, height, width, channels = images.shape
  if channels != 3:
    raise ConfigError(f"HOG targets need RGB images, got {channels} channels")
  _check_geometry(height, width, cell_size, gaussian_window)
  x = jnp.pad(images.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  # Cross-correlation with the reference's kernels, written out: x[i + u, j + v] is the
  # padded pixel under kernel entry (u, v).
  left, right = x[:, :, :-2], x[:, :, 2:]
  column_diff = left - right  # (B, H + 2, W, 3)
  gx = column_diff[:, :-2] + 2.0 * column_diff[:, 1:-1] + column_diff[:, 2:]
  top, bottom = x[:, :-2], x[:, 2:]
  row_diff = top - bottom  # (B, H, W + 2, 3)
  gy = row_diff[:, :, :-2] + 2.0 * row_diff[:, :, 1:-1] + row_diff[:, :, 2:]
  magnitude = jnp.sqrt(gx * gx + gy * gy)
  phase = jnp.arctan2(gx, gy) / math.pi * nbins
  bins = jnp.floor(phase).astype(jnp.int32) % nbins
  if gaussian_window:
    window = np.tile(gaussian_window_kernel(gaussian_window),
                     (height // gaussian_window, width // gaussian_window))
    magnitude = magnitude * window[None, :, :, None]

  def cell_sums(k):  # the scatter_add_ of one bin, summed over each cell
    votes = jnp.where(bins == k, magnitude, 0.0)
    return votes.reshape(batch, height // cell_size, cell_size, width // cell_size,
                         cell_size, channels).sum(axis=(2, 4))

  # One bin at a time: a one-hot (B, H, W, 3, nbins) would be stored whole on the CPU
  # (173 MB for 32 images at 224 px, against 22 MB).
  cells = jnp.moveaxis(jax.lax.map(cell_sums, jnp.arange(nbins)), 0, -1)
  norm = jnp.sqrt(jnp.sum(cells * cells, axis=-1, keepdims=True))
  return cells / jnp.maximum(norm, 1e-12)


def hog_patch_targets(images: jax.Array, patch_size: int = 16, *, nbins: int = NBINS,
                      cell_size: int = CELL_SIZE, gaussian_window: int = 0) -> jax.Array:
  """MaskFeat's per-patch HOG target, (B, L, 3 * nbins * (patch_size / cell_size)^2).

  Patches in raster order (as `mim_jax.models.patches.patchify`); within a patch the
  reference's order (channel, bin, cell row, cell column): 108 values for 16 px patches.
  """
  chex.assert_rank(images, 4)
  _, height, width, _ = images.shape
  if patch_size % cell_size or height % patch_size or width % patch_size:
    raise ConfigError(f"HOG patch targets need {cell_size} px cells to tile the "
                      f"{patch_size} px patches and the patches the {height}x{width} "
                      "image: use sizes that divide")
  cells = hog_cells(images, nbins=nbins, cell_size=cell_size,
                    gaussian_window=gaussian_window)
  batch, cells_h, cells_w, channels, _ = cells.shape
  per_side = patch_size // cell_size
  grid_h, grid_w = cells_h // per_side, cells_w // per_side
  x = cells.reshape(batch, grid_h, per_side, grid_w, per_side, channels, nbins)
  x = x.transpose(0, 1, 3, 5, 6, 2, 4)  # (B, gh, gw, channel, bin, cell row, cell col)
  return x.reshape(batch, grid_h * grid_w, channels * nbins * per_side * per_side)
