"""MaskFeat HOG targets against a float64 numpy HOG and a torch transcription of SlowFast's."""

import functools
import math

import jax
import numpy as np
import pytest

from mim_jax.errors import ConfigError
from mim_jax.objectives import hog

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@functools.lru_cache(maxsize=None)
def sample_photos(size):
  """scikit-image's sample photos in [0, 1]: their central 224 px, averaged down to size px."""
  from skimage import data, transform
  crops = []
  for photo in (data.astronaut(), data.chelsea(), data.coffee()):
    top, left = (photo.shape[0] - 224) // 2, (photo.shape[1] - 224) // 2
    crop = photo[top:top + 224, left:left + 224] / 255.0
    crops.append(transform.downscale_local_mean(crop, (224 // size, 224 // size, 1)))
  photos = np.stack(crops)
  photos.flags.writeable = False  # shared by the tests
  return photos


def normalised(images):
  return (images - MEAN) / STD


def numpy_hog_cells(images, nbins=9, cell=8, window=0):
  """float64 HOG from the MaskFeat / HOGLayerC maths: (B, H/cell, W/cell, 3, nbins)."""
  images = np.asarray(images, np.float64)
  batch, height, width, channels = images.shape
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  # windows[b, i, j, c] is the 3x3 neighbourhood of pixel (i, j): the conv's input.
  windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
  kernel_x = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)
  # The kernels' right (bottom) column (row) is minus the left (top) one: taking the
  # differences first keeps a flat neighbourhood's gradient exactly zero.
  gx = np.einsum("bhwcu,u->bhwc", windows[..., :, 0] - windows[..., :, 2], kernel_x[:, 0])
  gy = np.einsum("bhwcv,v->bhwc", windows[..., 0, :] - windows[..., 2, :], kernel_x.T[0])
  weight = np.ones((height, width))
  if window:
    n = (np.arange(window) - (window - 1) / 2) / (window // 2)
    g = np.exp(-0.5 * n**2)
    weight = np.tile(np.outer(g, g) / np.outer(g, g).sum(), (height // window, width // window))
  hist = np.zeros((batch, height // cell, width // cell, channels, nbins))
  for b in range(batch):
    for i in range(height):
      for j in range(width):
        for c in range(channels):
          angle = math.atan2(gx[b, i, j, c], gy[b, i, j, c])  # the reference's order
          k = math.floor(angle / math.pi * nbins) % nbins
          hist[b, i // cell, j // cell, c, k] += math.hypot(gx[b, i, j, c],
                                                            gy[b, i, j, c]) * weight[i, j]
  norm = np.sqrt((hist**2).sum(-1, keepdims=True))
  return hist / np.maximum(norm, 1e-12)


def numpy_patch_targets(cells, cells_per_patch):
  """One patch's values in the order (channel, bin, cell row, cell column); raster patches."""
  batch, ch, cw, _, _ = cells.shape
  out = []
  for pi in range(ch // cells_per_patch):
    for pj in range(cw // cells_per_patch):
      block = cells[:, pi * cells_per_patch:(pi + 1) * cells_per_patch,
                    pj * cells_per_patch:(pj + 1) * cells_per_patch]  # (B, r, c, ch, bin)
      out.append(block.transpose(0, 3, 4, 1, 2).reshape(batch, -1))
  return np.stack(out, axis=1)


def torch_maskfeat_targets(images_nhwc, patch_size, window):
  """SlowFast's HOGLayerC(nbins=9, pool=8) and MaskMViT._get_hog_label_2d, transcribed."""
  import torch
  import torch.nn.functional as F
  x = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
  weight_x = torch.FloatTensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]])
  weight_x = weight_x.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
  weight_y = weight_x.transpose(2, 3)
  nbins, pool = 9, 8
  x = F.pad(x, pad=(1, 1, 1, 1), mode="reflect")
  gx_rgb = F.conv2d(x, weight_x, bias=None, stride=1, padding=0, groups=3)
  gy_rgb = F.conv2d(x, weight_y, bias=None, stride=1, padding=0, groups=3)
  norm_rgb = torch.stack([gx_rgb, gy_rgb], dim=-1).norm(dim=-1)
  phase = torch.atan2(gx_rgb, gy_rgb) / math.pi * nbins
  b, c, h, w = norm_rgb.shape
  out = torch.zeros((b, c, nbins, h, w), dtype=torch.float)
  phase = phase.view(b, c, 1, h, w)
  norm_rgb = norm_rgb.view(b, c, 1, h, w)
  if window:
    n = torch.arange(0, window).float()
    n -= n.mean()
    n /= window // 2
    g = torch.exp(-0.5 * n**2)
    gkern = torch.outer(g, g)
    gkern = gkern / gkern.sum()
    norm_rgb *= gkern.repeat([h // window, h // window])
  out.scatter_add_(2, phase.floor().long() % nbins, norm_rgb)
  out = out.unfold(3, pool, pool).unfold(4, pool, pool).sum(dim=[-1, -2])
  out = F.normalize(out, p=2, dim=2)  # (B, 3, nbins, H/8, W/8)
  feat_size = h // patch_size
  tmp_hog = out.flatten(1, 2)
  unfold_size = tmp_hog.shape[-1] // feat_size
  tmp_hog = (tmp_hog.permute(0, 2, 3, 1).unfold(1, unfold_size, unfold_size)
             .unfold(2, unfold_size, unfold_size).flatten(1, 2).flatten(2))
  return tmp_hog.numpy()


# One compiled function per (shape, dtype, static arguments), shared by the tests.
targets = jax.jit(hog.hog_patch_targets, static_argnames=("patch_size", "gaussian_window"))


def integer_gradients(images):
  """Exact gradients of integer-valued images (B, H, W, 3), with the reference's kernels."""
  p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  columns = p[:, :, :-2] - p[:, :, 2:]
  rows = p[:, :-2] - p[:, 2:]
  gx = columns[:, :-2] + 2 * columns[:, 1:-1] + columns[:, 2:]
  gy = rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]
  return columns, gx, gy


@pytest.fixture(name="photos8bit", scope="module")
def photos8bit_fixture():
  """The sample photos at 32 px, 8-bit: the values a data pipeline gives (0..255)."""
  return np.round(sample_photos(32) * 255)


@pytest.mark.parametrize("window", [0, 16])
def test_targets_match_float64_reference(photos8bit, window):
  noise = np.random.default_rng(0).normal(size=photos8bit.shape)
  for name, images in {"8-bit photos": photos8bit, "gaussian noise": noise}.items():
    images = images.astype(np.float32)
    got = np.asarray(targets(images, patch_size=16, gaussian_window=window))
    want = numpy_patch_targets(numpy_hog_cells(images, window=window), 2)
    assert got.shape == (3, 4, 108) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    # Unit L2 norm over the 9 bins of every (channel, cell).
    norms = np.linalg.norm(got.reshape(3, 4, 3, 9, 4), axis=3)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5, err_msg=name)


def test_normalised_8bit_photos_differ_only_at_bin_edge_pixels(photos8bit):
  """A pixel whose exact gradient has gx = 0 (phase 0 or +-9, a bin edge) goes to bin 0
  or 8 by the float rounding of the normalised values; every other cell is exact."""
  got = np.asarray(targets(normalised(photos8bit / 255).astype(np.float32), patch_size=16,
                           gaussian_window=0))
  want = numpy_patch_targets(numpy_hog_cells(photos8bit), 2)  # exact: integer gradients
  columns, gx, gy = integer_gradients(photos8bit)
  # At an edge pixel whose three column differences are all zero, the float columns are
  # equal too and gx is exactly 0: only the others can round either way.
  flat_columns = (columns[:, :-2] == 0) & (columns[:, 1:-1] == 0) & (columns[:, 2:] == 0)
  rounding = (gx == 0) & (gy != 0) & ~flat_columns
  exposed = rounding.reshape(3, 4, 8, 4, 8, 3).any(axis=(2, 4))  # (B, cell row, col, ch)
  exposed = numpy_patch_targets(np.repeat(exposed[..., None], 9, -1), 2).astype(bool)
  assert 0.1 < exposed.mean() < 0.5  # most cells are compared
  np.testing.assert_allclose(got[~exposed], want[~exposed], atol=1e-5)


@pytest.mark.parametrize("size, window", [(224, 16), (32, 0)])
def test_patch_targets_match_torch_slowfast(size, window):
  """8-bit photos and normalised noise; 224 px is the reference's (14x14 patches)."""
  photos = np.round(sample_photos(size) * 255)
  noise = np.random.default_rng(1).normal(size=photos.shape)
  images = np.concatenate([photos, noise]).astype(np.float32)
  got = np.asarray(targets(images, patch_size=16, gaussian_window=window))
  assert got.shape == (6, (size // 16)**2, 108)
  np.testing.assert_allclose(got, torch_maskfeat_targets(images, 16, window), atol=1e-5)


def test_normalisation_does_not_change_the_targets():
  """Per-channel offset and positive scale cancel (zero-sum kernels, per-cell L2 norm)."""
  raw = np.random.default_rng(3).uniform(0, 255, size=(3, 32, 32, 3))
  a = targets(raw.astype(np.float32), patch_size=16, gaussian_window=0)
  b = targets(normalised(raw / 255).astype(np.float32), patch_size=16, gaussian_window=0)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_uint8_pixels_are_taken_as_their_values(photos8bit):
  np.testing.assert_array_equal(
      targets(photos8bit.astype(np.uint8), patch_size=16, gaussian_window=0),
      targets(photos8bit.astype(np.float32), patch_size=16, gaussian_window=0))


def test_a_patch_target_depends_on_its_own_pixels_and_their_one_pixel_ring():
  """Edit patch (1, 0)'s interior, then one pixel of one cell: exactly those targets move."""
  rng = np.random.default_rng(2)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  base = np.asarray(targets(images, patch_size=16, gaussian_window=0))

  def changed(edited):
    got = np.asarray(targets(edited, patch_size=16, gaussian_window=0))
    return np.abs(got - base) > 1e-6

  edited = images.copy()
  edited[1, 17:31, 1:15] = rng.normal(size=(14, 14, 3))  # the 3x3 stencil stays inside
  moved = changed(edited)
  assert np.array_equal(np.argwhere(moved.any(-1)), [[1, 2]])  # image 1, patch 1 * 2 + 0
  edited = images.copy()
  edited[0, 26, 28, 2] += 3.0  # patch (1, 1) = 3, its cell (1, 1), channel 2
  moved = changed(edited)
  assert np.array_equal(np.argwhere(moved.any(-1)), [[0, 3]])
  layout = moved[0, 3].reshape(3, 9, 2, 2)  # (channel, bin, cell row, cell column)
  assert layout[2, :, 1, 1].any()
  layout[2, :, 1, 1] = False
  assert not layout.any()


def test_vmap_agrees_with_the_batched_call(photos8bit):
  images = photos8bit.astype(np.float32)
  mapped = jax.jit(jax.vmap(lambda x: hog.hog_patch_targets(x, 16, gaussian_window=16)))(
      images[:, None])
  np.testing.assert_allclose(mapped[:, 0], targets(images, patch_size=16, gaussian_window=16),
                             atol=1e-6)


@pytest.mark.parametrize("function, shape, kwargs, match", [
    ("hog_cells", (1, 36, 36, 3), {}, "cells of 8 px must tile the 36x36"),
    ("hog_patch_targets", (1, 40, 40, 3), {"patch_size": 16}, "16 px patches"),
    ("hog_patch_targets", (1, 32, 32, 1), {}, "RGB images, got 1 channels"),
    ("hog_patch_targets", (1, 48, 48, 3), {"gaussian_window": 32},
     "gaussian_window=32 must tile"),
])
def test_bad_geometry_is_one_config_error(function, shape, kwargs, match):
  with pytest.raises(ConfigError, match=match) as info:
    getattr(hog, function)(np.zeros(shape, np.float32), **kwargs)
  assert "\n" not in str(info.value)
