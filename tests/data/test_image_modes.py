"""Every PIL mode a data set may hold decodes to the right 8-bit RGB (16-bit PNGs included).

Each image is built from a gradient whose 8-bit RGB is known independently of
PIL's conversions; both decoders (`decode_rgb`: evaluation; `decode_for_crop`:
training) must give it.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mim_jax.data import transforms

# A 16-bit ramp over the whole range: 1024 steps of 64, offset so no value is a multiple of 256.
RAMP16 = (np.arange(1024, dtype=np.uint32) * 64 + 17).astype(np.uint16)[None].repeat(6, 0)


def _decoded(data: bytes) -> list[np.ndarray]:
  """`data` decoded by both decoders, as uint8 arrays."""
  whole, box, scale = transforms.decode_for_crop(data, lambda height, width: (0, 0, height, width))
  assert box[2:] == whole.size[::-1] and scale == 1.0
  return [np.asarray(transforms.decode_rgb(data)), np.asarray(whole)]


def _saved(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def _png16(pixels: np.ndarray) -> bytes:
  """A 16-bit PNG written from the specification (PIL cannot write 16-bit colour)."""
  height, width = pixels.shape[:2]
  channels = 1 if pixels.ndim == 2 else pixels.shape[2]
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # grey, grey+alpha, RGB, RGBA

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
  header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF"),
                                      ("I", "TIFF")])
def test_sixteen_bit_grey_keeps_its_top_byte(mode: str, fmt: str):
  if mode == "I":
    image = Image.fromarray(RAMP16.astype(np.int32))
  else:
    image = Image.frombytes(mode, RAMP16.shape[::-1],
                            RAMP16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
  assert image.mode == mode
  expected = _grey_rgb(RAMP16 >> 8)  # 17 + 64k -> floor(k / 4): 0..255, mean 127.5
  for decoded in _decoded(_saved(image, fmt)):
    # Clipping at 255 (PIL's convert) gave a mean of 254.4: an almost white image.
    assert abs(decoded.mean() - 127.5) < 1e-9
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_sixteen_bit_png_of_every_colour_type(channels: int):
  planes = [RAMP16, 65535 - RAMP16, RAMP16 // 3, np.full_like(RAMP16, 40000)][:channels]
  pixels = planes[0] if channels == 1 else np.stack(planes, -1)
  colour = planes[:3] if channels >= 3 else [planes[0]] * 3  # Alpha (plane 2 or 4) dropped.
  expected = np.stack([plane >> 8 for plane in colour], -1).astype(np.uint8)
  for decoded in _decoded(_png16(pixels)):
    np.testing.assert_array_equal(decoded, expected)


def test_one_bit_image_is_black_and_white():
  checker = (np.indices((12, 20)).sum(0) % 2).astype(bool)
  image = Image.frombytes("1", (20, 12), np.packbits(checker, axis=1).tobytes())
  assert np.array_equal(np.asarray(image), checker)
  for decoded in _decoded(_saved(image, "PNG")):
    np.testing.assert_array_equal(decoded, _grey_rgb(checker * 255))


def test_palette_image_takes_its_palette_colours():
  rng = np.random.default_rng(0)
  palette = rng.integers(0, 256, (256, 3), np.uint8)
  indices = rng.integers(0, 256, (10, 14), np.uint8)
  image = Image.fromarray(indices)
  image.putpalette(palette.tobytes())
  assert image.mode == "P"
  for decoded in _decoded(_saved(image, "PNG")):
    np.testing.assert_array_equal(decoded, palette[indices])


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_dropped_not_blended(mode: str):
  rng = np.random.default_rng(1)
  colour = rng.integers(0, 256, (9, 11, 3 if mode == "RGBA" else 1), np.uint8)
  alpha = rng.integers(0, 256, (9, 11, 1), np.uint8)
  image = Image.fromarray(np.concatenate([colour, alpha], -1).squeeze())
  assert image.mode == mode
  expected = colour if mode == "RGBA" else np.repeat(colour, 3, -1)
  for decoded in _decoded(_saved(image, "PNG")):
    np.testing.assert_array_equal(decoded, expected)


def test_cmyk_becomes_the_rgb_it_was_made_from():
  y, x = np.mgrid[:40, :60]
  rgb = np.stack([x * 4, y * 6, 255 - x * 4], -1).astype(np.uint8)
  # Naive CMYK with K = 0 (what PIL writes): C = 255 - R, M = 255 - G, Y = 255 - B.
  cmyk = np.concatenate([255 - rgb, np.zeros_like(rgb[..., :1])], -1)
  image = Image.frombytes("CMYK", (60, 40), cmyk.tobytes())
  for decoded in _decoded(_saved(image, "TIFF")):  # Lossless.
    np.testing.assert_array_equal(decoded, rgb)
  for decoded in _decoded(_saved(image, "JPEG")):  # Adobe CMYK JPEG: lossy.
    assert np.abs(decoded.astype(int) - rgb).mean() < 3
