"""timm's RandomErasing, split between the grain workers (the box) and the device (the fill).

MAE's and MAE-Lite's fine-tuning erase one box per image after ToTensor +
Normalize: timm `RandomErasing(probability=re_prob, mode=re_mode,
max_count=re_count, device='cpu')` with re_prob=0.25, re_mode='pixel',
re_count=1. In mim_jax the workers produce uint8 crops and normalisation
happens on the device, where the 'pixel' fill (N(0, 1) per pixel and channel,
in the normalised space) can live. So:

* `EraseBox`, a `WorkerField` (mim_jax.data.spec), draws the box in the
  worker from the example's numpy generator, by timm's `_erase` with count 1:
  erase with probability `probability` (timm: skip when random() > p), then up
  to 10 attempts of target area = uniform(min_area, max_area) * H * W and
  aspect = exp(uniform(log min_aspect, log max_aspect)),
  h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) (Python's
  round, half to even); the first attempt with h < H and w < W places the
  box at top = randint(0, H - h), left = randint(0, W - w) (inclusive). It
  emits int32 [top, left, h, w]; [0, 0, 0, 0] when nothing is erased (no
  draw, or 10 failed attempts). The draws are the same calls in the same
  order as timm's on Python's `random`, numpy's generator standing in.
* `erase` fills the boxes of a normalised batch on the device: 'pixel' (the
  MAE setting), 'rand' (one N(0, 1) colour per image) or 'const' (zeros).

Worker side: numpy only. Device side: jnp only.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.errors import ConfigError

ATTEMPTS = 10  # timm's tries to fit a box before giving up on the image
NO_BOX = (0, 0, 0, 0)
MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class EraseBox:
  """The box timm's RandomErasing (count 1) erases in one image: int32 [top, left, h, w].

  A picklable `WorkerField`; the image size is fixed per view, so it is given
  here. h = w = 0 means no erasing (see the module docstring for the draws).

  Attributes:
    size: the image side (square views), or (height, width).
    probability: chance that an image is erased at all (timm's re_prob).
    min_area / max_area: range of the erased fraction of the image area.
    min_aspect / max_aspect: range of h / w, sampled log-uniformly; max_aspect
      None = 1 / min_aspect (timm's default).
    name: the batch key.
  """
  size: int | tuple[int, int]
  probability: float = 0.25
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3
  max_aspect: float | None = None
  name: str = "erase_box"

  def __post_init__(self):
    height, width = self.shape
    if height < 1 or width < 1:
      raise ConfigError(f"random erasing needs a positive image size, got {self.size}")
    if not 0.0 <= self.probability <= 1.0:
      raise ConfigError(f"random erasing probability {self.probability} is not in [0, 1]")
    if not 0.0 < self.min_area <= self.max_area:
      raise ConfigError(f"random erasing area range ({self.min_area}, {self.max_area}) must "
                        f"satisfy 0 < min_area <= max_area")
    if not 0.0 < self.min_aspect <= self.aspect_range[1]:
      raise ConfigError(f"random erasing aspect range ({self.min_aspect}, {self.max_aspect}) "
                        f"must satisfy 0 < min_aspect <= max_aspect")

  @property
  def shape(self) -> tuple[int, int]:
    """(height, width) of the images."""
    if isinstance(self.size, int):
      return self.size, self.size
    height, width = self.size
    return int(height), int(width)

  @property
  def aspect_range(self) -> tuple[float, float]:
    return self.min_aspect, self.max_aspect or 1 / self.min_aspect

  def make(self, rng: np.random.Generator) -> np.ndarray:
    """One image's box from its generator (the draws of timm's `_erase`, count 1)."""
    if rng.random() > self.probability:
      return np.array(NO_BOX, np.int32)
    height, width = self.shape
    area = height * width
    log_aspect = tuple(math.log(a) for a in self.aspect_range)
    for _ in range(ATTEMPTS):
      target_area = float(rng.uniform(self.min_area, self.max_area)) * area
      aspect = math.exp(float(rng.uniform(*log_aspect)))
      box_h = int(round(math.sqrt(target_area * aspect)))
      box_w = int(round(math.sqrt(target_area / aspect)))
      if box_w < width and box_h < height:
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        return np.array((top, left, box_h, box_w), np.int32)
    return np.array(NO_BOX, np.int32)


def box_mask(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """(B, H, W) bool: True inside each image's box [top, left, h, w]."""
  chex.assert_shape(boxes, (None, 4))
  top, left, box_h, box_w = (boxes[:, i, None] for i in range(4))
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top) & (rows < top + box_h)
  in_cols = (cols >= left) & (cols < left + box_w)
  return in_rows[:, :, None] & in_cols[:, None, :]


def erase(images: jax.Array, boxes: jax.Array, rng: jax.Array,
          mode: str = "pixel") -> jax.Array:
  """Fills each image's box (from `EraseBox`) in a normalised batch, as timm's fill modes.

  Args:
    images: (B, H, W, C) normalised images (any float dtype; kept).
    boxes: (B, 4) int [top, left, h, w]; h = 0 or w = 0 erases nothing.
    rng: the key of the fill. The fill is drawn for the whole batch shape,
      whatever the boxes: 'pixel' N(0, 1) of shape (B, H, W, C), 'rand' one N(0, 1)
      colour (B, 1, 1, C) per image, 'const' zeros.
    mode: 'pixel' (MAE's re_mode), 'rand' or 'const'.

  Returns:
    the images with each box replaced by the fill, in `images.dtype`.
  """
  if mode not in MODES:
    raise ConfigError(f"random erasing mode {mode!r} is unknown; choose from {MODES}")
  chex.assert_rank(images, 4)
  chex.assert_shape(boxes, (images.shape[0], 4))
  batch, height, width, channels = images.shape
  if mode == "pixel":
    fill = jax.random.normal(rng, images.shape, jnp.float32)
  elif mode == "rand":
    fill = jax.random.normal(rng, (batch, 1, 1, channels), jnp.float32)
  else:
    fill = jnp.zeros((batch, 1, 1, channels), jnp.float32)
  mask = box_mask(boxes, height, width)[..., None]
  return jnp.where(mask, fill.astype(images.dtype), images)
