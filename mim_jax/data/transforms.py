"""Per-record image transforms; they run inside grain worker processes (numpy/PIL only).

Input records are `{'image': encoded bytes, 'label': int, 'id': str}` (see
`sources.py`); outputs are `{'image': uint8 (S, S, 3) RGB, 'label': int32}`.

Training follows torchvision's `RandomResizedCrop(S, scale, ratio,
interpolation=BICUBIC)` + `RandomHorizontalFlip()` as used by MAE, with numpy's
generator in place of torch's; fine-tuning adds `Augment` (timm's RandAugment
and colour jitter, see `augment.py`) after them. Evaluation follows
`Resize(int(S / ratio), BICUBIC)` + `CenterCrop(S)` (MAE's fine-tuning eval
with ratio = crop_pct).

Reduced JPEG decoding (`DecodeRandomResizedCrop(reduced_decode=True)`,
data.reduced_jpeg_decode; off by default): decoding the whole JPEG dominates the
pipeline's cost when the crop is then shrunk a lot (64 or 112 px training on
~400x350 ImageNet photos). The crop box is drawn from the header's size, then
libjpeg decodes at the largest 1/2, 1/4 or 1/8 DCT scaling (PIL's `draft`) that
still leaves the box `image_size` pixels per side, and the box, now fractional,
is resampled exactly. The random draws (box, flip) are those of a full decode,
but the pixels differ slightly (DCT-domain downscaling before the bicubic
resize), so the default stays bit-identical to torchvision. Other formats, and
crops shrunk less than 2x, decode in full as before.

JPEG decoders (`DecodeRandomResizedCrop(decoder=...)`, data.decoder; jpeg.py):
'pil' (default) keeps torchvision's pixels bit for bit, JPEGs being decoded by
libjpeg-turbo directly when that is bit-identical; 'turbo' decodes reduced by
DCT scaling and resizes with OpenCV: same random draws, pixels ~0.7 gray levels
apart on average, about 1.7x the images per core at 224 px.

An image that cannot be decoded becomes a *marker* record (empty image plus an
'error' string) which `SkipUndecodable` drops, counts and logs.

grain's spawned workers outlive a main process killed by SIGKILL (preemption,
OOM killer, `kill -9`), idling with ~250 MB each. The decode transforms,
when unpickled in a worker, start `exit_with_parent` so the worker exits soon
after its parent dies.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from mim_jax.data import augment, jpeg
from mim_jax.data.data_config import DataError
from mim_jax.data.rgb import to_rgb

Record = dict[str, Any]
Box = tuple[int, int, int, int]  # (top, left, height, width), as torchvision's get_params
CROP_ATTEMPTS = 10
PARENT_POLL_SECONDS = 1.0
_watching_parent = False


def exit_with_parent() -> None:
  """In a multiprocessing child (a grain worker): exit once the parent process is gone.

  A daemon thread polls the parent pid every PARENT_POLL_SECONDS; when the child
  has been re-parented, it exits at once. The child also ignores SIGINT: Ctrl-C
  reaches the whole process group, and the parent (which saves, then stops its
  workers) handles it; a worker would only print a traceback. No-op in a main
  process and after the first call.
  """
  global _watching_parent
  if _watching_parent or multiprocessing.parent_process() is None:
    return
  _watching_parent = True
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  # No clean-up: the parent is gone.

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _ExitsWithParent:
  """Mixin: unpickling the transform in a worker process starts `exit_with_parent`."""

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    exit_with_parent()


def decode_rgb(data: bytes) -> Image.Image:
  """Decodes encoded image bytes to an RGB PIL image (grayscale/RGBA/CMYK/P converted).

  Alpha is dropped, as torchvision's default loader does (`convert('RGB')`);
  16-bit grey keeps its top 8 bits (`rgb.to_rgb`). A JPEG is decoded by libjpeg-turbo
  directly when that gives Pillow's pixels bit for bit (`jpeg.decode_like_pillow`),
  about 1.2x faster.
  """
  pixels = jpeg.decode_like_pillow(data)  # data.decoder (jpeg.py): exact, faster JPEG decode
  if pixels is not None:
    return Image.fromarray(pixels)
  with Image.open(io.BytesIO(data)) as image:
    return to_rgb(image)


def sample_crop_box(height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float], rng: np.random.Generator) -> Box:
  """torchvision's `RandomResizedCrop.get_params`: a random box of the image.

  Tries CROP_ATTEMPTS times a box whose area is `scale` (uniform) of the image
  and whose aspect ratio w/h is `ratio` (uniform in log space); falls back to
  a centred crop clipped to the `ratio` range.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return center_crop_box(height, width, ratio)


def center_crop_box(height: int, width: int, ratio: tuple[float, float]) -> Box:
  """torchvision's fallback: the largest centred box with aspect ratio within `ratio`."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def decode_for_crop(data: bytes, sample_box: Callable[[int, int], Box], min_side: int = 0,
                    decoder: str = "pil") -> tuple[Image.Image | np.ndarray, Box, float]:
  """Decodes `data` to RGB as `decode_rgb`, first drawing the box `sample_box(height, width)`.

  With `min_side` > 0, a JPEG is decoded at the largest DCT reduction (1/2, 1/4,
  1/8: PIL's `draft`) that keeps the box at least `min_side` pixels per side;
  other formats decode in full (`draft` returns None). The box is drawn from the
  header's full size either way, so the random draws do not depend on the option.
  With decoder='turbo' (see jpeg.py), a JPEG libjpeg-turbo decodes to RGB comes
  back as a numpy array, which `resized_crop` resizes with OpenCV.

  Returns:
    The RGB image, the box in full-size pixels, and the image's scale relative
    to the full size (1.0, or 1/2, 1/4, 1/8 after a reduced decode).
  """
  if decoder == "turbo":  # data.decoder (jpeg.py): the fast path, other pixels
    decoded = jpeg.decode_for_crop(data, sample_box, min_side, fallback=decode_rgb)
    if decoded is not None:
      return decoded
    min_side = 0  # CMYK and other formats: the exact path
  elif min_side == 0 and (size := jpeg.rgb_jpeg_size(data)) is not None:
    return decode_rgb(data), sample_box(*size), 1.0  # the exact path, decoded faster
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    box = sample_box(height, width)
    scale = 1.0
    if min_side > 0:
      _, _, h, w = box
      # Pillow picks the largest reduction that keeps the image >= this size, and returns
      # (mode, box of the full image in reduced pixels).
      drafted = image.draft("RGB", (math.ceil(width * min_side / w),
                                    math.ceil(height * min_side / h)))
      if drafted is not None:
        scale = drafted[1][2] / width
    return to_rgb(image), box, scale


def resized_crop(image: Image.Image | np.ndarray, box: Box, size: int,
                 scale: float = 1.0) -> np.ndarray:
  """Crops `box` and resizes it to (size, size) bicubically, as torchvision's F.resized_crop on PIL.

  A numpy `image` comes from decoder='turbo' and is resized by `jpeg.resized_crop`.

  With `scale` != 1, `image` is a reduced decode and `box` is in full-size pixels:
  the scaled, fractional box is resampled exactly (PIL's resize `box`) from the
  whole pixels around it, as rounding it to whole pixels would shift the crop by
  up to 1/scale full-size pixels. With scale 1 this is the plain crop and resize.
  """
  if isinstance(image, np.ndarray):  # decoded by decoder='turbo'
    return jpeg.resized_crop(image, box, size, scale)
  top, left, h, w = box
  x0, y0, x1, y1 = left * scale, top * scale, (left + w) * scale, (top + h) * scale
  outer = (math.floor(x0), math.floor(y0), min(math.ceil(x1), image.width),
           min(math.ceil(y1), image.height))
  cropped = image.crop(outer)
  inner = (x0 - outer[0], y0 - outer[1], x1 - outer[0], y1 - outer[1])
  return np.asarray(cropped.resize((size, size), Image.Resampling.BICUBIC, box=inner))


def resize_center_crop(image: Image.Image, size: int, resize_ratio: float) -> np.ndarray:
  """torchvision's Resize(int(size / resize_ratio), BICUBIC) then CenterCrop(size)."""
  short_target = int(size / resize_ratio)
  width, height = image.size
  if width <= height:
    new_w, new_h = short_target, int(short_target * height / width)
  else:
    new_w, new_h = int(short_target * width / height), short_target
  resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)))


def undecodable(record: Record, error: Exception) -> Record:
  """The marker record standing for an image that could not be decoded."""
  where = record.get("id", "unknown record")
  return {"image": np.zeros((0, 0, 3), np.uint8), "label": np.int32(record["label"]),
          "error": f"{where}: {type(error).__name__}: {error}"}


def _validate_size(image_size: int) -> None:
  if image_size <= 0:
    raise DataError(f"image_size must be positive, got {image_size}.")


@dataclasses.dataclass(frozen=True)
class DecodeRandomResizedCrop(_ExitsWithParent, grain.transforms.RandomMap):
  """Decode, RandomResizedCrop to `image_size` (bicubic), random horizontal flip.

  Randomness comes only from the per-record generator grain passes in (seeded
  by the sampler seed and the record's position), so it is reproducible.
  `reduced_decode` decodes JPEGs at a reduced size when the crop allows it (see
  the module doc): same random draws, slightly different pixels. `decoder`
  'turbo' is the fast path of jpeg.py (same draws, other pixels); 'pil' keeps
  torchvision's pixels.
  """

  image_size: int
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  reduced_decode: bool = False
  decoder: str = "pil"

  def __post_init__(self):
    _validate_size(self.image_size)
    if self.decoder not in jpeg.DECODERS:
      raise DataError(f"data.decoder {self.decoder!r} unknown: use 'pil' (torchvision's pixels) "
                      "or 'turbo' (faster, pixels differ slightly; see mim_jax/data/jpeg.py).")
    if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
      raise DataError(f"crop_scale {tuple(self.scale)} and crop_ratio {tuple(self.ratio)} must "
                      "be (low, high) with 0 < low <= high.")

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    sample_box = functools.partial(sample_crop_box, scale=self.scale, ratio=self.ratio, rng=rng)
    try:
      image, box, scale = decode_for_crop(element["image"], sample_box, self._min_side(),
                                          decoder=self.decoder)
    except Exception as error:  # pylint: disable=broad-exception-caught  # Any bad file.
      return undecodable(element, error)
    pixels = resized_crop(image, box, self.image_size, scale)
    if self.flip and rng.random() < 0.5:
      pixels = jpeg.flip_horizontally(pixels)
    return {"image": np.ascontiguousarray(pixels), "label": np.int32(element["label"])}

  def _min_side(self) -> int:
    """Decode JPEGs reduced while the crop keeps this many pixels per side (0: in full)."""
    if self.reduced_decode:
      return self.image_size
    # 'turbo' reduces only while the area filter still averages >= 2 pixels per output pixel.
    return 2 * self.image_size if self.decoder == "turbo" else 0


@dataclasses.dataclass(frozen=True)
class DecodeCenterCrop(_ExitsWithParent, grain.transforms.Map):
  """Decode, resize the shorter side to int(image_size / resize_ratio), centre-crop image_size."""

  image_size: int
  resize_ratio: float = 0.875

  def __post_init__(self):
    _validate_size(self.image_size)
    if not 0 < self.resize_ratio <= 1:
      raise DataError(f"eval_resize_ratio must be in (0, 1], got {self.resize_ratio}.")

  def map(self, element: Record) -> Record:
    try:
      image = decode_rgb(element["image"])
    except Exception as error:  # pylint: disable=broad-exception-caught  # Any bad file.
      return undecodable(element, error)
    pixels = resize_center_crop(image, self.image_size, self.resize_ratio)
    return {"image": pixels, "label": np.int32(element["label"])}


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """RandAugment then colour jitter on the decoded, cropped uint8 image (either may be None).

  Runs after `DecodeRandomResizedCrop` on the same per-record generator, as
  timm's create_transform runs them after its crop and flip. Marker records of
  undecodable images pass through untouched.
  """

  rand_augment: augment.RandAugment | None = None
  color_jitter: augment.ColorJitter | None = None

  def random_map(self, element: Record, rng: np.random.Generator) -> Record:
    if "error" in element:
      return element
    image = Image.fromarray(element["image"])
    if self.rand_augment is not None:
      image = self.rand_augment(image, rng)
    if self.color_jitter is not None:
      image = self.color_jitter(image, rng)
    return {**element, "image": np.asarray(image)}


@dataclasses.dataclass(frozen=True)
class KeepFields(grain.transforms.Map):
  """Keeps only `fields` of each record (e.g. drops 'label' from pre-training batches)."""

  fields: tuple[str, ...]

  def map(self, element: Record) -> Record:
    return {key: element[key] for key in self.fields}


class SkipUndecodable(grain.transforms.Filter):
  """Drops marker records of undecodable images, logging a running count.

  Counts are per process (each grain worker has its own copy). More than
  `max_consecutive` markers in a row means no batch can be formed: raise.
  """

  def __init__(self, max_consecutive: int):
    self.max_consecutive = max_consecutive
    self.skipped = 0
    self._consecutive = 0

  def filter(self, element: Record) -> bool:
    error = element.get("error")
    if error is None:
      self._consecutive = 0
      return True
    self.skipped += 1
    self._consecutive += 1
    logging.warning("Skipping an image that cannot be decoded (%s); %d skipped so far in this "
                    "process.", error, self.skipped)
    if self._consecutive > self.max_consecutive:
      raise DataError(f"{self._consecutive} images in a row could not be decoded (last: {error}), "
                      "so no batch can be formed: check that data.data_dir holds valid images.")
    return False
