"""JPEG decoding with libjpeg-turbo (simplejpeg) and SIMD crop-resizing (OpenCV) for the loader.

Decoding a JPEG and resizing its crop are almost all of a training record's
cost, and both are slow through Pillow: its decoder copies the image twice
(4-byte pixels, then `convert`) and its bicubic resize is plain C. Two paths,
chosen by `data.decoder`:

'pil' (default): torchvision's pixels, bit for bit. A JPEG that libjpeg-turbo
  decodes to RGB itself (YCbCr or grayscale) is decoded by simplejpeg, which
  runs the very code Pillow runs (libjpeg-turbo, same DCT and chroma
  upsampling) into one numpy array (0.81 against Pillow's 1.20 ms per
  ImageNet-sized JPEG here, 1.00 counting the copy into a PIL image); the crop
  is then resized by Pillow as before, and flipped by OpenCV. This is used
  only after `turbo_matches_pillow` found both libraries give the same pixels
  (checked once per process on JPEGs of every chroma layout); otherwise, and
  for other formats and CMYK, Pillow decodes.

'turbo': the fastest path, with slightly different pixels. The crop box and
  the flip are drawn exactly as on the 'pil' path (same sizes, same generator
  calls), then:
  * a JPEG is decoded at 1/2, 1/4 or 1/8 size by libjpeg-turbo's DCT scaling
    when the crop keeps >= 2 x image_size pixels per side (>= image_size with
    data.reduced_jpeg_decode), so the resize still averages >= 2 pixels;
  * the crop is resized by OpenCV: area averaging when it shrinks both sides
    (`INTER_AREA`, an antialiasing filter like Pillow's), bicubic otherwise.
  Pixels differ from the 'pil' path by (mean / 99th percentile of |difference|,
  gray levels, over the 300-image `bench_data` folder, same boxes): 224 px
  0.68 / 6, 112 px 0.94 / 7, 64 px 1.76 / 15 (max 28, 64, 100 at edges);
  with data.reduced_jpeg_decode: 0.75, 2.36, 3.85 mean. CMYK and non-JPEG
  images take the 'pil' path unchanged.

Per-image CPU cost of decode + crop + resize + flip on that folder (this
2-core machine, best of 6 runs): 224 px 'pil' 2.7 ms (Pillow alone: 3.4),
'turbo' 1.6 ms; 112 px 1.9 / 1.2; 64 px 1.9 / 1.1.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, features

Box = tuple[int, int, int, int]  # (top, left, height, width), as in transforms.py
DECODERS = ("pil", "turbo")
REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's DCT scalings that decode faster than full size
# Colour spaces libjpeg-turbo converts to RGB as Pillow does; CMYK / YCCK are left to Pillow.
_RGB_COLORSPACES = ("YCbCr", "Gray")


@functools.cache
def _cv2() -> Any:
  """OpenCV, imported on first use (~0.5 s) and limited to one thread.

  Each grain worker is one core; OpenCV's own thread pool would oversubscribe them.
  """
  import cv2  # pylint: disable=import-outside-toplevel

  cv2.setNumThreads(1)
  return cv2


def rgb_jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) of a JPEG libjpeg-turbo decodes to RGB; None for anything else.

  None also for an unreadable header and for images above Pillow's
  decompression-bomb limit (Pillow then decides, as it would have).
  """
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None
  limit = Image.MAX_IMAGE_PIXELS
  if colorspace not in _RGB_COLORSPACES or (limit is not None and height * width > limit):
    return None
  return height, width


def decode(data: bytes, reduction: int = 1) -> np.ndarray | None:
  """The RGB pixels (uint8, (H, W, 3)) of a JPEG at 1/`reduction` size; None if libjpeg warns.

  Strict: a file libjpeg-turbo only recovers from (truncated, corrupt data)
  returns None, so that the caller lets Pillow decide, as on the exact path.
  """
  try:
    if reduction == 1:
      return simplejpeg.decode_jpeg(data, "rgb")
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(data, "rgb", min_height=math.ceil(height / reduction),
                                  min_width=math.ceil(width / reduction))
  except ValueError:
    return None


def decode_like_pillow(data: bytes) -> np.ndarray | None:
  """Pillow's `convert('RGB')` pixels of a JPEG decoded by simplejpeg; None: Pillow must decode.

  None for other formats, CMYK, files libjpeg-turbo warns about, and when the
  two libraries do not give the same pixels here (`turbo_matches_pillow`).
  """
  if rgb_jpeg_size(data) is None or not turbo_matches_pillow():
    return None
  return decode(data)


@functools.cache
def turbo_matches_pillow() -> bool:
  """Whether simplejpeg decodes JPEGs to Pillow's pixels bit for bit in this environment.

  Both must run libjpeg-turbo with the same decoding code; checked on small
  JPEGs of every chroma layout Pillow writes, baseline and progressive, once
  per process (about 2 ms).
  """
  if not features.check_feature("libjpeg_turbo"):
    return False
  rng = np.random.default_rng(0)
  # Smooth gradients plus noise: both the upsampling and the IDCT are exercised.
  ramp = np.linspace(0, 255, 37 * 45).reshape(37, 45, 1)
  pixels = np.clip(ramp + rng.normal(0, 40, (37, 45, 3)), 0, 255).astype(np.uint8)
  for mode, subsampling, progressive in [("RGB", 0, False), ("RGB", 1, False),
                                         ("RGB", 2, False), ("RGB", 2, True),
                                         ("L", -1, False)]:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90,
                                               subsampling=subsampling, progressive=progressive)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
      expected = np.asarray(image.convert("RGB"))
    decoded = decode(buffer.getvalue())
    if decoded is None or not np.array_equal(decoded, expected):
      return False
  return True


def reduction_for(box: Box, min_side: int) -> int:
  """The largest DCT reduction (8, 4, 2; else 1) that keeps `box` >= `min_side` pixels per side."""
  _, _, height, width = box
  for reduction in REDUCTIONS:
    if min_side > 0 and min(height, width) >= reduction * min_side:
      return reduction
  return 1


def decode_for_crop(data: bytes, sample_box: Callable[[int, int], Box], min_side: int,
                    fallback: Callable[[bytes], Image.Image]
                    ) -> tuple[np.ndarray, Box, float] | None:
  """The 'turbo' decode: draws the box from the header, decodes reduced while it keeps `min_side`.

  Returns (RGB pixels, the box in full-size pixels, the pixels' scale 1/r),
  or None, without drawing the box, for data libjpeg-turbo does not decode to
  RGB itself (other formats, CMYK): the caller takes the 'pil' path. A JPEG
  libjpeg-turbo warns about is decoded by `fallback` (Pillow), which decides
  whether it is readable.
  """
  size = rgb_jpeg_size(data)
  if size is None:
    return None
  box = sample_box(*size)
  reduction = reduction_for(box, min_side)
  pixels = decode(data, reduction)
  if pixels is None:
    return np.asarray(fallback(data)), box, 1.0
  return pixels, box, 1.0 / reduction


def resized_crop(pixels: np.ndarray, box: Box, size: int, scale: float = 1.0) -> np.ndarray:
  """Crops `box` (full-size pixels; `pixels` at `scale`), resizes it to (size, size) with OpenCV.

  The box is rounded to whole pixels of the reduced image (a shift of at most
  half a reduced pixel); area averaging when both sides shrink, else bicubic.
  """
  top, left, height, width = box
  rows = slice(round(top * scale), max(round((top + height) * scale), round(top * scale) + 1))
  cols = slice(round(left * scale), max(round((left + width) * scale), round(left * scale) + 1))
  crop = pixels[rows, cols]
  shrinks = crop.shape[0] > size and crop.shape[1] > size
  cv2 = _cv2()
  return cv2.resize(crop, (size, size),
                    interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_CUBIC)


def flip_horizontally(pixels: np.ndarray) -> np.ndarray:
  """`pixels[:, ::-1]` as a new contiguous array (OpenCV: ~20x faster than numpy's strided copy)."""
  return _cv2().flip(np.ascontiguousarray(pixels), 1)
