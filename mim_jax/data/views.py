"""The training transform a data spec asks for: one decode per record, one crop per view.

`DecodeViews` runs in the grain workers. For each record it draws, from the
record's own generator (grain seeds it from the sampler seed and the record's
position, so a resumed run draws the same), in this fixed order:

  1. for view 0, 1, ...: its RandomResizedCrop box (torchvision's `get_params`),
     then its flip (only when the view flips);
  2. for view 0, 1, ...: the fine-tuning augmentations (RandAugment, colour
     jitter) when the spec asks for them and the data config sets them;
  3. for field 0, 1, ...: `field.make(rng)`.

It decodes the image once (between 1 and 2: the draws do not depend on the
decoder) and resizes each view's box from that decode. A one-view spec thus
draws exactly what `transforms.DecodeRandomResizedCrop` followed by
`transforms.Augment` draw, and gives bit-identical pixels.

With data.reduced_jpeg_decode, a JPEG is decoded at the largest 1/2, 1/4 or
1/8 reduction that leaves every view's box at least the view's size per side
(the view with the fewest box pixels per output pixel decides).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from mim_jax.data import augment, jpeg, transforms
from mim_jax.data.data_config import DataError, config_value
from mim_jax.data.spec import DataSpec

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Crop:
  """One view's RandomResizedCrop (bicubic) + horizontal flip, every setting filled in."""

  key: str
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  flip: bool

  def __post_init__(self):
    if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or (
        self.size <= 0):
      raise DataError(f"View {self.key!r} has size {self.size!r}: use a positive number of "
                      "pixels (image_size).")
    for name, (low, high) in (("crop_scale", self.scale), ("crop_ratio", self.ratio)):
      if not 0 < low <= high:
        raise DataError(f"{name} {(low, high)} of view {self.key!r} invalid: use "
                        "(low, high) with 0 < low <= high.")


def view_crops(spec: DataSpec, data_config: Any) -> tuple[Crop, ...]:
  """The crops of `spec`'s views; a view field left None takes the data config's value."""

  def pair(value: Any, key: str) -> tuple[float, float]:
    value = config_value(data_config, key) if value is None else value
    try:
      low, high = (float(v) for v in value)
    except (TypeError, ValueError):
      raise DataError(f"data.{key} {value!r} invalid: use two numbers (low, high).") from None
    return low, high

  return tuple(
      Crop(view.key, view.size, pair(view.crop_scale, "crop_scale"),
           pair(view.crop_ratio, "crop_ratio"),
           bool(config_value(data_config, "flip") if view.flip is None else view.flip))
      for view in spec.views)


@dataclasses.dataclass(frozen=True)
# pylint: disable-next=protected-access  # Workers exit with their parent, as transforms' do.
class DecodeViews(transforms._ExitsWithParent, grain.transforms.RandomMap):
  """Decode once; each view's crop, flip and augmentation; then the worker fields (module doc).

  Output: {crop.key: uint8 (size, size, 3) for each crop, field.name: field.make(rng)
  for each field, 'label': int32}; an undecodable image gives a marker record
  (`transforms.undecodable`) for `SkipUndecodable` to drop.
  """

  crops: tuple[Crop, ...]
  reduced_decode: bool = False
  augmentation: transforms.Augment | None = None
  worker_fields: tuple[Any, ...] = ()
  decoder: str = "pil"  # data.decoder: 'pil' (torchvision's pixels) or 'turbo' (jpeg.py)

  def __post_init__(self):
    if not self.crops:
      raise ValueError("DecodeViews needs at least one crop")
    if self.decoder not in jpeg.DECODERS:
      raise DataError(f"data.decoder {self.decoder!r} unknown: use 'pil' (torchvision's pixels) "
                      "or 'turbo' (faster, pixels differ slightly; see mim_jax/data/jpeg.py).")

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    drawn: list[tuple[transforms.Box, bool]] = []

    def sample_boxes(height: int, width: int) -> transforms.Box:
      for crop in self.crops:
        box = transforms.sample_crop_box(height, width, crop.scale, crop.ratio, rng)
        drawn.append((box, crop.flip and rng.random() < 0.5))
      return self._decode_box([box for box, _ in drawn])

    try:
      image, _, scale = transforms.decode_for_crop(element["image"], sample_boxes,
                                                   self._min_side, decoder=self.decoder)
    except Exception as error:  # pylint: disable=broad-exception-caught  # Any bad file.
      return transforms.undecodable(element, error)
    out = {}
    for crop, (box, flip) in zip(self.crops, drawn):
      pixels = transforms.resized_crop(image, box, crop.size, scale)
      out[crop.key] = np.ascontiguousarray(pixels[:, ::-1] if flip else pixels)
    if self.augmentation is not None:
      for crop in self.crops:
        out[crop.key] = self.augmentation.random_map({"image": out[crop.key]}, rng)["image"]
    for field in self.worker_fields:
      out[field.name] = np.asarray(field.make(rng))
    out["label"] = np.int32(element["label"])
    return out

  @property
  def _min_side(self) -> int:
    """What `decode_for_crop` must keep of `_decode_box`'s box per side (0: decode in full).

    'turbo' reduces only while its area filter still averages >= 2 pixels per output pixel.
    """
    largest = max(crop.size for crop in self.crops)
    if self.reduced_decode:
      return largest
    return 2 * largest if self.decoder == "turbo" else 0

  def _decode_box(self, boxes: Sequence[transforms.Box]) -> transforms.Box:
    """One box for `decode_for_crop`: a reduction keeping it >= `_min_side` per side keeps all.

    It is the box of the view with the fewest box pixels per output pixel, scaled
    by _min_side / that view's size (so exactly that box when the view is the
    largest, as for one view). Every other view has at least as many box pixels
    per output pixel, so it keeps >= its size per side at that reduction too.
    """
    if len(boxes) == 1 or not self._min_side:
      return boxes[0]
    ratios = [min(box[2], box[3]) / crop.size for box, crop in zip(boxes, self.crops)]
    index = int(np.argmin(ratios))
    top, left, h, w = boxes[index]
    factor = self._min_side / self.crops[index].size
    return top, left, h * factor, w * factor  # Only h and w matter; fractional is fine.


def train_transform(spec: DataSpec, data_config: Any) -> DecodeViews:
  """`spec`'s decode/crop/augment/fields transform with the data config's settings."""
  augmentation = train_augmentation(data_config)  # Checked even when the spec leaves it out.
  if augmentation is not None and not spec.augment:
    logging.info("%s is not applied: the task's data spec asks for no augmentation.",
                 augmentation)
    augmentation = None
  return DecodeViews(view_crops(spec, data_config),
                     reduced_decode=bool(config_value(data_config, "reduced_jpeg_decode")),
                     augmentation=augmentation, worker_fields=tuple(spec.worker_fields),
                     decoder=config_value(data_config, "decoder"))


# --------------------------------------------------------------------------- #
# Fine-tuning augmentation from the data config
# --------------------------------------------------------------------------- #


def train_augmentation(data_config: Any) -> transforms.Augment | None:
  """The RandAugment / colour-jitter step the data config asks for (None: neither).

  Follows timm's `create_transform`: colour jitter is left out while RandAugment
  is on unless data.force_color_jitter (logged when that drops it).

  Raises:
    DataError: a setting out of range or of the wrong type.
  """
  magnitude = config_value(data_config, "randaug_magnitude")
  mstd = _number(data_config, "randaug_mstd", low=0.0)
  num_ops = config_value(data_config, "randaug_num_ops")
  jitter = _number(data_config, "color_jitter", low=0.0)
  force = config_value(data_config, "force_color_jitter")
  if magnitude is not None:
    magnitude = _number(data_config, "randaug_magnitude", low=0.0, high=augment.MAX_MAGNITUDE)
  if isinstance(num_ops, bool) or not isinstance(num_ops, (int, np.integer)) or num_ops < 1:
    raise DataError(f"data.randaug_num_ops {num_ops!r} invalid: use an integer >= 1 "
                    "(ops per image; timm's default 2).")
  if not isinstance(force, (bool, np.bool_)):
    raise DataError(f"data.force_color_jitter {force!r} invalid: use True or False.")
  rand_augment = (augment.RandAugment(magnitude, mstd, int(num_ops))
                  if magnitude is not None else None)
  if jitter and rand_augment is not None and not force:
    logging.info("data.color_jitter=%s is not applied: RandAugment is on, and timm's "
                 "create_transform (MAE's fine-tuning) then disables colour jitter; set "
                 "data.force_color_jitter=True to apply both.", jitter)
    jitter = 0.0
  color_jitter = augment.ColorJitter(jitter, jitter, jitter) if jitter else None
  if rand_augment is None and color_jitter is None:
    return None
  return transforms.Augment(rand_augment, color_jitter)


def _number(data_config: Any, key: str, *, low: float, high: float = math.inf) -> float:
  """data.<key> as a float in [low, high]."""
  value = config_value(data_config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not low <= value <= high):
    allowed = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
    raise DataError(f"data.{key} {value!r} invalid: use a number {allowed}.")
  return float(value)
