"""Classification losses, Mixup / CutMix and top-k counts for fine-tuning (docs/methods.md §7).

Plain jnp functions that run on device inside a jitted step. Mixup / CutMix follow
timm's `timm.data.Mixup` in `mode='batch'` with `correct_lam=True`: one draw per
batch, every row i mixed with row B-1-i (timm's `x.flip(0)`), soft targets from
label-smoothed one-hots. The random draws are separated from their use
(`draw_mix` / `mix_from_draws`) so the draws can be replayed through timm in tests.
"""

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from mim_jax.errors import ConfigError


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """(B,) int labels -> (B, num_classes) float32, as timm's `one_hot` inside `mixup_target`.

  off = smoothing / num_classes on every class, on = 1 - smoothing + off on the label,
  so every row sums to 1.
  """
  if num_classes < 1:
    raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError(f"label smoothing must be in [0, 1), got {smoothing}")
  chex.assert_rank(labels, 1)
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  hit = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]
  return jnp.where(hit, jnp.float32(on_value), jnp.float32(off_value))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """mean_b sum_c -targets[b, c] * log_softmax(logits)[b, c], in float32.

  timm's `SoftTargetCrossEntropy`; with one-hot targets it is the usual cross entropy.
  """
  chex.assert_rank(logits, 2)
  chex.assert_equal_shape([logits, targets])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(-targets.astype(jnp.float32) * log_probs, axis=-1))


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  """timm `Mixup(mode='batch', correct_lam=True)` arguments (hashable: a static jit arg).

  Attributes:
    num_classes: classes of the (smoothed) one-hot targets.
    mixup_alpha: Beta(alpha, alpha) for mixup; 0 disables mixup.
    cutmix_alpha: Beta(alpha, alpha) for cutmix; 0 disables cutmix.
    cutmix_minmax: (min, max) box side as a fraction of the image side, drawn
      uniformly instead of from lam (timm's `rand_bbox_minmax`); enables cutmix
      (timm then forces cutmix_alpha = 1, which only matters for being enabled).
    prob: probability that a batch is mixed at all.
    switch_prob: with both mixup and cutmix enabled, probability of cutmix.
    label_smoothing: smoothing of the one-hot targets (applied before mixing).

  With mixup and cutmix both disabled nothing is mixed (lam = 1) and the targets
  are the smoothed one-hots: the same loss as timm's `LabelSmoothingCrossEntropy`,
  which timm uses when mixing is off.
  """
  num_classes: int
  mixup_alpha: float = 1.0
  cutmix_alpha: float = 0.0
  cutmix_minmax: tuple[float, float] | None = None
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
    for name in ("mixup_alpha", "cutmix_alpha"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("prob", "switch_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f"mixup {name} must be in [0, 1], got {getattr(self, name)}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.cutmix_minmax is not None:
      minmax = tuple(self.cutmix_minmax)
      if len(minmax) != 2 or not 0.0 <= minmax[0] < minmax[1] <= 1.0:
        raise ConfigError(f"cutmix_minmax must be (min, max) with 0 <= min < max <= 1, "
                          f"got {self.cutmix_minmax!r}")
      object.__setattr__(self, "cutmix_minmax", minmax)

  @property
  def mixup_enabled(self) -> bool:
    return self.mixup_alpha > 0

  @property
  def cutmix_enabled(self) -> bool:
    return self.cutmix_alpha > 0 or self.cutmix_minmax is not None

  @property
  def cutmix_beta_alpha(self) -> float:
    """The Beta parameter timm draws cutmix's lam from (forced to 1 with cutmix_minmax)."""
    return 1.0 if self.cutmix_minmax is not None else self.cutmix_alpha

  @property
  def enabled(self) -> bool:
    return self.prob > 0 and (self.mixup_enabled or self.cutmix_enabled)


class MixDraws(NamedTuple):
  """The random numbers timm's `Mixup` draws for one batch (scalars on device).

  Attributes:
    u_apply: U[0, 1); the batch is mixed when u_apply < prob.
    u_switch: U[0, 1); cutmix rather than mixup when u_switch < switch_prob (both enabled).
    lam_mixup: Beta(mixup_alpha, mixup_alpha) (1 when mixup is disabled).
    lam_cutmix: Beta(cutmix_alpha, cutmix_alpha) (1 when cutmix is disabled); with
      cutmix_minmax it only decides, as in timm, that a draw of exactly 1 mixes nothing.
    box: int32 (4,): the box centre (cy, cx, 0, 0) for `rand_bbox`, or
      (cut_h, cut_w, top, left) for `rand_bbox_minmax`.
  """
  u_apply: jax.Array
  u_switch: jax.Array
  lam_mixup: jax.Array
  lam_cutmix: jax.Array
  box: jax.Array


def _betas(key: jax.Array, alphas: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
  """Beta(a, a) for each a > 0 (one sampler for both: it is slow to compile); 1 where a = 0."""
  if not any(a > 0 for a in alphas):
    return jnp.float32(1.0), jnp.float32(1.0)
  safe = jnp.asarray([a if a > 0 else 1.0 for a in alphas], jnp.float32)
  draws = jax.random.beta(key, safe, safe, dtype=jnp.float32)
  return tuple(draws[i] if a > 0 else jnp.float32(1.0) for i, a in enumerate(alphas))


def _minmax_sides(side: int, minmax: tuple[float, float]) -> tuple[int, int]:
  """[low, high) of the box side, as timm's `np.random.randint(int(s*min), int(s*max))`."""
  low, high = int(side * minmax[0]), int(side * minmax[1])
  if high <= low:
    raise ConfigError(f"cutmix_minmax {minmax} leaves no box size for a {side}-px side")
  return low, high


def draw_box(key: jax.Array, config: MixupConfig, height: int, width: int) -> jax.Array:
  """int32 (4,): the box centre (cy, cx, 0, 0), or (cut_h, cut_w, top, left) with cutmix_minmax.

  The same ranges as timm's `np.random.randint` calls in `rand_bbox` / `rand_bbox_minmax`.
  """
  keys = jax.random.split(key, 4)
  if config.cutmix_minmax is None:
    box = [jax.random.randint(keys[0], (), 0, height), jax.random.randint(keys[1], (), 0, width),
           jnp.int32(0), jnp.int32(0)]
  else:
    low_h, high_h = _minmax_sides(height, config.cutmix_minmax)
    low_w, high_w = _minmax_sides(width, config.cutmix_minmax)
    cut_h = jax.random.randint(keys[0], (), low_h, high_h)
    cut_w = jax.random.randint(keys[1], (), low_w, high_w)
    box = [cut_h, cut_w, jax.random.randint(keys[2], (), 0, height - cut_h + 1),
           jax.random.randint(keys[3], (), 0, width - cut_w + 1)]
  return jnp.stack(box).astype(jnp.int32)


def draw_mix(key: jax.Array, config: MixupConfig, height: int, width: int) -> MixDraws:
  """All random numbers one batch needs (some are unused, depending on the branch)."""
  keys = jax.random.split(key, 4)
  u_apply = jax.random.uniform(keys[0], (), jnp.float32)
  u_switch = jax.random.uniform(keys[1], (), jnp.float32)
  lam_mixup, lam_cutmix = _betas(keys[2], (config.mixup_alpha, config.cutmix_beta_alpha))
  box = draw_box(keys[3], config, height, width)
  return MixDraws(u_apply, u_switch, lam_mixup, lam_cutmix, box)


def rand_bbox(height: int, width: int, lam: jax.Array, centre_y: jax.Array,
              centre_x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(top, bottom, left, right), half-open, as timm's `rand_bbox` given its centre draw.

  Side = int(side * sqrt(1 - lam)), centred at (cy, cx), clipped to the image.
  """
  ratio = jnp.sqrt(1.0 - lam.astype(jnp.float32))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  top = jnp.clip(centre_y - cut_h // 2, 0, height)
  bottom = jnp.clip(centre_y + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(centre_x - cut_w // 2, 0, width)
  right = jnp.clip(centre_x + (cut_w + 1) // 2, 0, width)
  return top, bottom, left, right


def box_mask(height: int, width: int, box: tuple[jax.Array, ...]) -> jax.Array:
  """(H, W) bool, True inside the half-open box (top, bottom, left, right): iota compares."""
  top, bottom, left, right = box
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def _cutmix_box(config: MixupConfig, draws: MixDraws, height: int,
                width: int) -> tuple[jax.Array, ...]:
  if config.cutmix_minmax is None:
    return rand_bbox(height, width, draws.lam_cutmix, draws.box[0], draws.box[1])
  cut_h, cut_w, top, left = (draws.box[i] for i in range(4))
  return top, top + cut_h, left, left + cut_w


def mix_from_draws(images: jax.Array, labels: jax.Array, draws: MixDraws | None,
                   config: MixupConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixes a batch with its reverse as timm's `Mixup(mode='batch')` does for these draws.

  Args:
    images: (B, H, W, C) float, B even.
    labels: (B,) int class ids.
    draws: from `draw_mix` (unused, may be None, when `config.enabled` is False).
    config: the mixing recipe (static).

  Returns:
    (mixed images (B, H, W, C) in the input dtype, soft targets (B, num_classes)
    float32, lam float32 scalar): row i = lam * own + (1 - lam) * row B-1-i, for
    images (per pixel for cutmix) and targets alike. With cutmix, lam = 1 - box area
    / image area after clipping (timm's correct_lam).
  """
  chex.assert_rank(images, 4)
  chex.assert_type(images, float)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([images, labels], 1)
  batch, height, width, _ = images.shape
  one_hot = one_hot_smoothed(labels, config.num_classes, config.label_smoothing)
  if not config.enabled:
    return images, one_hot, jnp.float32(1.0)
  if batch % 2:
    raise ConfigError(f"mixup/cutmix needs an even batch size (as timm), got {batch}")
  if config.mixup_enabled and config.cutmix_enabled:
    use_cutmix = draws.u_switch < config.switch_prob
  else:
    use_cutmix = jnp.bool_(config.cutmix_enabled)
  apply = draws.u_apply < config.prob
  # timm returns the batch untouched when the Beta draw is exactly 1 (either branch).
  apply &= jnp.where(use_cutmix, draws.lam_cutmix, draws.lam_mixup) < 1.0

  inside = box_mask(height, width, _cutmix_box(config, draws, height, width))
  lam_cutmix = 1.0 - jnp.sum(inside, dtype=jnp.float32) / (height * width)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, draws.lam_mixup), 1.0)
  # Weight of a row's own pixel: lam everywhere (mixup), 0 inside the box (cutmix).
  own = jnp.where(apply & use_cutmix, (~inside).astype(jnp.float32), lam)
  own = jnp.broadcast_to(own, (height, width))[None, :, :, None]
  flipped = images[::-1].astype(jnp.float32)
  mixed = (images.astype(jnp.float32) * own + flipped * (1.0 - own)).astype(images.dtype)

  targets = one_hot * lam + one_hot[::-1] * (1.0 - lam)
  return mixed, targets, lam.astype(jnp.float32)


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array,
                 config: MixupConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup / CutMix of a batch on device (timm `Mixup(mode='batch')`); see `mix_from_draws`.

  With mixing disabled (`config.enabled` False) nothing is drawn: the images come back
  as they are, with the smoothed one-hot targets and lam = 1.
  """
  chex.assert_rank(images, 4)
  if not config.enabled:
    return mix_from_draws(images, labels, None, config)
  draws = draw_mix(key, config, images.shape[1], images.shape[2])
  return mix_from_draws(images, labels, draws, config)


def topk_correct(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...] = (1, 5),
                 valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """{'top{k}': int32 count of rows whose label is among the k largest logits}.

  Ties go to the lower class index (`lax.top_k`, like a stable descending argsort).
  A k above the number of classes counts every row, as timm's `accuracy`. `valid`
  (B,) bool leaves out padded rows of a last eval batch.
  """
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([logits, labels], 1)
  if not ks or any(k < 1 for k in ks):
    raise ConfigError(f"top-k needs k >= 1, got {ks}")
  num_classes = logits.shape[1]
  _, top = jax.lax.top_k(logits, min(max(ks), num_classes))
  hits = top == labels[:, None]
  if valid is not None:
    chex.assert_shape(valid, labels.shape)
    hits = hits & valid[:, None]
  return {f"top{k}": jnp.sum(hits[:, :min(k, num_classes)], dtype=jnp.int32) for k in ks}


def eval_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over the valid rows: count, top-1/top-5 hits and cross entropy ('loss_sum')."""
  hits = topk_correct(logits, labels, (1, 5), valid=valid)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
  return {"count": jnp.sum(valid, dtype=jnp.int32), **hits,
          "loss_sum": jnp.sum(jnp.where(valid, nll, 0.0))}
