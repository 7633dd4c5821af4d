"""Fine-tuning augmentation: timm's RandAugment ('rand-m<m>-mstd<s>-inc1') and colour jitter.

Mirrors what MAE's fine-tuning gets from `timm.data.create_transform(...,
is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic')`
(timm/data/auto_augment.py, transforms_factory.py), on the same Pillow calls
timm makes, with numpy's per-record generator in place of Python's `random`:

* `rand_augment_transform`: `num_ops` ops drawn uniformly *with replacement*
  from the 15 'increasing' ops (RAND_INCREASING_OPS, timm's
  `_RAND_INCREASING_TRANSFORMS`); each is applied with probability 0.5; its
  magnitude is drawn per application from N(m, mstd) (uniform in [0, m] when
  mstd > 100, fixed when mstd = 0), then clipped to [0, 10]; ops with a
  direction (rotate, shear, translate, enhance) flip sign with probability 0.5.
* `create_transform`'s hparams: geometric ops fill with the ImageNet mean
  (FILL) and resample bicubically (interpolation='bicubic'); translations are
  relative, up to 0.45 of the side.
* Colour jitter is torchvision's `ColorJitter(b, c, s)` on PIL images: random
  order, factors uniform in [max(0, 1 - v), 1 + v]. timm does NOT apply it
  while RandAugment is on (transforms_factory.py, `transforms_imagenet_train`:
  `disable_color_jitter = not (force_color_jitter or '3a' in auto_augment)`;
  timm 1.0.31's `create_transform` cannot even pass force_color_jitter on, and
  older timm has no such flag: jitter is an `elif color_jitter is not None:`
  after the auto-augment branch), so MAE's `--color_jitter` does nothing next to
  `--aa rand-...`. `make_train_loader` follows that rule, with
  data.force_color_jitter to override it.

Pure numpy + Pillow (it runs in grain workers; no torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0       # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10].
UNIFORM_MSTD = 100.0       # timm: an mstd above this samples uniformly in [0, m].
TRANSLATE_FRACTION = 0.45  # timm's default translate_pct for TranslateXRel / TranslateYRel.
# timm's create_transform: img_mean = round(255 * IMAGENET_DEFAULT_MEAN).
FILL = tuple(min(255, round(255 * x)) for x in (0.485, 0.456, 0.406))  # (124, 116, 104)
RESAMPLE = Image.Resampling.BICUBIC

# timm's _RAND_INCREASING_TRANSFORMS, in its order.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class OpCall:
  """One op to apply: its name, magnitude (after sampling and clipping) and direction."""

  name: str
  magnitude: float
  negate: bool = False


# --------------------------------------------------------------------------- #
# Magnitude -> op argument (timm's LEVEL_TO_ARG for the 'increasing' ops)
# --------------------------------------------------------------------------- #


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def _rotate_degrees(magnitude: float, negate: bool) -> float:
  return _signed((magnitude / MAX_MAGNITUDE) * 30.0, negate)


def _enhance_factor(magnitude: float, negate: bool) -> float:
  # 1.0 is 'no change'; the blend moves towards 0.1 or 1.9 as the magnitude grows.
  return max(0.1, 1.0 + _signed((magnitude / MAX_MAGNITUDE) * 0.9, negate))


def _shear_factor(magnitude: float, negate: bool) -> float:
  return _signed((magnitude / MAX_MAGNITUDE) * 0.3, negate)


def _translate_fraction(magnitude: float, negate: bool) -> float:
  return _signed((magnitude / MAX_MAGNITUDE) * TRANSLATE_FRACTION, negate)


def _posterize_bits(magnitude: float, negate: bool) -> int:
  del negate
  return 4 - int((magnitude / MAX_MAGNITUDE) * 4)


def _solarize_threshold(magnitude: float, negate: bool) -> int:
  del negate
  return 256 - min(256, int((magnitude / MAX_MAGNITUDE) * 256))


def _solarize_addition(magnitude: float, negate: bool) -> int:
  del negate
  return min(128, int((magnitude / MAX_MAGNITUDE) * 110))


# --------------------------------------------------------------------------- #
# The ops (timm's, on Pillow)
# --------------------------------------------------------------------------- #


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=RESAMPLE,
                         fillcolor=FILL)


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
  return image.rotate(degrees, resample=RESAMPLE, fillcolor=FILL)


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` most significant bits: Pillow's ImageOps.posterize, 0 bits included.

  PosterizeIncreasing keeps 0 bits at magnitude 10: Pillow 13 (installed here)
  refuses that, so timm 1.0.31 raises there; the Pillow MAE ran with, and this
  function, give a black image.
  """
  if bits >= 8:
    return image
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return image.point([value & mask for value in range(256)] * len(image.getbands()))


def _solarize_add(image: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
  if image.mode not in ("L", "RGB"):
    return image  # As timm: other modes are left unchanged.
  lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _enhance(enhancer: type) -> Callable[[Image.Image, float], Image.Image]:
  return lambda image, factor: enhancer(image).enhance(factor)


_OPS: dict[str, tuple[Callable[..., Image.Image], Callable[[float, bool], float] | None, bool]] = {
    # name: (op(image[, argument]), magnitude -> argument, whether the sign is random)
    "AutoContrast": (ImageOps.autocontrast, None, False),
    "Equalize": (ImageOps.equalize, None, False),
    "Invert": (ImageOps.invert, None, False),
    "Rotate": (_rotate, _rotate_degrees, True),
    "PosterizeIncreasing": (_posterize, _posterize_bits, False),
    "SolarizeIncreasing": (ImageOps.solarize, _solarize_threshold, False),
    "SolarizeAdd": (_solarize_add, _solarize_addition, False),
    "ColorIncreasing": (_enhance(ImageEnhance.Color), _enhance_factor, True),
    "ContrastIncreasing": (_enhance(ImageEnhance.Contrast), _enhance_factor, True),
    "BrightnessIncreasing": (_enhance(ImageEnhance.Brightness), _enhance_factor, True),
    "SharpnessIncreasing": (_enhance(ImageEnhance.Sharpness), _enhance_factor, True),
    "ShearX": (lambda image, f: _affine(image, (1, f, 0, 0, 1, 0)), _shear_factor, True),
    "ShearY": (lambda image, f: _affine(image, (1, 0, 0, f, 1, 0)), _shear_factor, True),
    "TranslateXRel": (lambda image, t: _affine(image, (1, 0, t * image.size[0], 0, 1, 0)),
                      _translate_fraction, True),
    "TranslateYRel": (lambda image, t: _affine(image, (1, 0, 0, 0, 1, t * image.size[1])),
                      _translate_fraction, True),
}


def op_argument(name: str, magnitude: float, negate: bool = False) -> float | int | None:
  """The argument op `name` gets at `magnitude` (None for ops without one)."""
  to_argument = _OPS[name][1]
  return None if to_argument is None else to_argument(magnitude, negate)


def is_signed(name: str) -> bool:
  """Whether op `name` draws a random direction (timm's `_randomly_negate`)."""
  return _OPS[name][2]


def apply_op(image: Image.Image, call: OpCall) -> Image.Image:
  """Applies one op at its magnitude and direction, exactly as timm's `AugmentOp` does."""
  operation, to_argument, _ = _OPS[call.name]
  if to_argument is None:
    return operation(image)
  return operation(image, to_argument(call.magnitude, call.negate))


# --------------------------------------------------------------------------- #
# The policies
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's `rand_augment_transform('rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1')`.

  `sample(rng)` draws what to do (in timm's order: the ops, then per op its
  application, magnitude and sign); `__call__` does it.
  """

  magnitude: float
  magnitude_std: float = 0.0
  num_ops: int = 2
  prob: float = 0.5
  ops: tuple[str, ...] = dataclasses.field(default=RAND_INCREASING_OPS, repr=False)

  def __post_init__(self):
    unknown = [name for name in self.ops if name not in _OPS]
    if unknown:
      raise ValueError(f"Unknown RandAugment ops {unknown}; known: {sorted(_OPS)}.")

  def sample_magnitude(self, rng: np.random.Generator) -> float:
    """One op's magnitude: N(m, mstd), U(0, m) when mstd > 100, or m; clipped to [0, 10]."""
    magnitude = self.magnitude
    if self.magnitude_std > UNIFORM_MSTD:
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return float(max(0.0, min(magnitude, MAX_MAGNITUDE)))

  def sample(self, rng: np.random.Generator) -> list[OpCall]:
    """The ops to apply to one image, in order (skipped draws left out)."""
    calls = []
    for index in rng.integers(0, len(self.ops), size=self.num_ops):
      name = self.ops[index]
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      magnitude = self.sample_magnitude(rng)
      negate = bool(rng.random() > 0.5) if is_signed(name) else False
      calls.append(OpCall(name, magnitude, negate))
    return calls

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for call in self.sample(rng):
      image = apply_op(image, call)
    return image


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """torchvision's `ColorJitter(brightness, contrast, saturation)` (no hue) on PIL images.

  A strength of 0 leaves that adjustment out (torchvision: None).
  """

  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0

  def __post_init__(self):
    for name in ("brightness", "contrast", "saturation"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"ColorJitter {name} must be >= 0, got {getattr(self, name)}.")

  @property
  def strengths(self) -> tuple[float, float, float]:
    return self.brightness, self.contrast, self.saturation

  def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, list[float | None]]:
    """(order of the 4 adjustments, factors of brightness/contrast/saturation; None = off)."""
    order = rng.permutation(4)  # torchvision: torch.randperm(4); index 3 (hue) is off.
    factors = [None if v == 0 else float(rng.uniform(max(0.0, 1.0 - v), 1.0 + v))
               for v in self.strengths]
    return order, factors

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    order, factors = self.sample(rng)
    return adjust_colours(image, order, factors)


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def adjust_colours(image: Image.Image, order: Sequence[int],
                   factors: Sequence[float | None]) -> Image.Image:
  """torchvision's adjust_brightness / adjust_contrast / adjust_saturation, in `order`."""
  for index in order:
    if index < 3 and factors[index] is not None:
      image = _ENHANCERS[index](image).enhance(factors[index])
  return image
