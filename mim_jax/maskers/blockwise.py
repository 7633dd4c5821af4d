"""Block-wise masking of BEiT and MaskFeat (images), made in the data workers.

The reference is `MaskingGenerator` in microsoft/unilm `beit/masking_generator.py`,
copied unchanged (but for the default `min_num_patches=16`) into facebookresearch/
SlowFast `slowfast/datasets/transform.py` for MaskFeat. Until `num_masking_patches`
patches of the (height, width) token grid are masked, it places one rectangle:

  up to 10 attempts of
    target_area  = uniform(min_num_patches, max_mask_patches)
    aspect_ratio = exp(uniform(log(min_aspect), log(max_aspect)))
    h = int(round(sqrt(target_area * aspect_ratio)))
    w = int(round(sqrt(target_area / aspect_ratio)))
    if w < width and h < height (strictly: no block spans the grid):
      top = randint(0, height - h), left = randint(0, width - w)
      the block is masked if it adds between 1 and max_mask_patches new patches;
      the attempts stop at the first that added any;

where max_mask_patches = min(num_masking_patches - masked so far, max_num_patches).
The outer loop stops when an attempt round added nothing, so the mask can hold FEWER
than num_masking_patches patches (never more); this is reproduced, not corrected
(BEiT v2's copy tops the count up with random patches; this is v1's behaviour). Over
2000 seeds, 34 % of BEiT's masks fall short of 75 (mean 74.5, min 63) and 29 % of
MaskFeat's short of 78 (mean 77.6, min 70); on tiny grids a mask can even be empty.

Python's `random.uniform(a, b)` is `a + (b - a) * random()` and `random.randint(a, b)`
is uniform over [a, b]: here they are `a + (b - a) * rng.random()` and
`rng.integers(a, b, endpoint=True)` on the example's `numpy.random.Generator`, drawn
in the reference's order, so the same draws give the same mask.

Settings. BEiT (`beit/run_beit_pretraining.py`, `beit/datasets.py`): 14x14 grid,
`--num_mask_patches 75` (about 40 % of 196), `--min_mask_patches_per_block 16` (the
class's own default, 4, is not used), `--max_mask_patches_per_block None`
(= num_masking_patches), `min_aspect=0.3`, `max_aspect=None` (= 1 / 0.3): `beit()`.
MaskFeat on images (`slowfast/datasets/imagenet.py` `_prepare_im_masked`, config
`configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml`): the 14x14 grid of the last
pre-trained block, num = round(196 * 0.4) = 78 (Python's round), min_num_patches =
num // 5 = 15, max_num_patches = `AUG.MAX_MASK_PATCHES_PER_BLOCK` (default None),
aspect 0.3 .. 1 / 0.3: `maskfeat()`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mim_jax.errors import ConfigError

ATTEMPTS = 10  # rectangles tried per placement, as the reference


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ConfigError(f"block-wise masking {name}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class BlockwiseMasker:
  """BEiT's `MaskingGenerator` as a `WorkerField`: `make(rng)` -> bool (height, width).

  Attributes:
    grid: token grid (height, width), or one int for a square grid.
    num_masking_patches: patches to mask (the mask may hold fewer, as the reference's).
    min_num_patches: smallest target area of one block.
    max_num_patches: largest area of one block; None = num_masking_patches.
    min_aspect: smallest block aspect ratio h / w.
    max_aspect: largest; None = 1 / min_aspect.
    name: the batch key of the mask.
  """
  grid: int | tuple[int, int]
  num_masking_patches: int
  min_num_patches: int = 16
  max_num_patches: int | None = None
  min_aspect: float = 0.3
  max_aspect: float | None = None
  name: str = "token_mask"

  def __post_init__(self):
    grid = self.grid if isinstance(self.grid, (tuple, list)) else (self.grid,) * 2
    if len(grid) != 2:
      raise ConfigError(f"block-wise masking grid={self.grid!r} must be one int or "
                        "(height, width)")
    for side in grid:
      _check_int("grid", side, 1)
    object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
    _check_int("num_masking_patches", self.num_masking_patches, 1)
    if self.num_masking_patches > grid[0] * grid[1]:
      raise ConfigError(f"block-wise masking num_masking_patches={self.num_masking_patches} "
                        f"exceeds the {grid[0]}x{grid[1]} grid's {grid[0] * grid[1]} patches")
    _check_int("min_num_patches", self.min_num_patches, 0)
    if self.max_num_patches is not None:
      _check_int("max_num_patches", self.max_num_patches, 1)
    if not self.min_aspect > 0:
      raise ConfigError(f"block-wise masking min_aspect={self.min_aspect!r} must be > 0")
    if self.max_aspect is None and self.min_aspect > 1:
      raise ConfigError(f"block-wise masking min_aspect={self.min_aspect!r} must be <= 1 "
                        "when max_aspect is None (it defaults to 1 / min_aspect)")
    if self.max_aspect is not None and not self.max_aspect >= self.min_aspect:
      raise ConfigError(f"block-wise masking max_aspect={self.max_aspect!r} must be >= "
                        f"min_aspect={self.min_aspect!r}")

  @classmethod
  def maskfeat(cls, grid: int = 14, mask_ratio: float = 0.4, **kwargs) -> "BlockwiseMasker":
    """SlowFast's image MaskFeat: round(ratio * patches) masked, blocks of >= that // 5."""
    if not 0.0 < mask_ratio < 1.0:
      raise ConfigError(f"block-wise masking mask_ratio={mask_ratio!r} must be in (0, 1)")
    height, width = grid if isinstance(grid, (tuple, list)) else (grid, grid)
    num = round(height * width * mask_ratio)
    return cls(grid, num_masking_patches=num, min_num_patches=num // 5, **kwargs)

  @classmethod
  def beit(cls, grid: int = 14, num_masking_patches: int = 75, **kwargs) -> "BlockwiseMasker":
    """BEiT pre-training's defaults: 75 of 14x14 patches, blocks of >= 16."""
    return cls(grid, num_masking_patches=num_masking_patches, min_num_patches=16, **kwargs)

  @property
  def max_block(self) -> int:
    return self.num_masking_patches if self.max_num_patches is None else self.max_num_patches

  @property
  def log_aspect_range(self) -> tuple[float, float]:
    max_aspect = self.max_aspect or 1 / self.min_aspect
    return math.log(self.min_aspect), math.log(max_aspect)

  def make(self, rng: np.random.Generator) -> np.ndarray:
    """One example's mask, bool (height, width), True = masked."""
    mask = np.zeros(self.grid, dtype=bool)
    count = 0
    while count < self.num_masking_patches:
      max_mask_patches = min(self.num_masking_patches - count, self.max_block)
      added = self._place_block(mask, max_mask_patches, rng)
      if added == 0:
        break
      count += added
    return mask

  def _place_block(self, mask: np.ndarray, max_mask_patches: int,
                   rng: np.random.Generator) -> int:
    """The reference's `_mask`: masks one rectangle in place; returns the patches it added."""
    height, width = self.grid
    log_low, log_high = self.log_aspect_range
    added = 0
    for _ in range(ATTEMPTS):
      low = self.min_num_patches
      target_area = low + (max_mask_patches - low) * rng.random()
      aspect_ratio = math.exp(log_low + (log_high - log_low) * rng.random())
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < width and h < height:
        top = int(rng.integers(0, height - h, endpoint=True))
        left = int(rng.integers(0, width - w, endpoint=True))
        block = mask[top:top + h, left:left + w]
        new = h * w - int(block.sum())
        if 0 < new <= max_mask_patches:
          block[...] = True
          added += new
        if added > 0:
          break
    return added
