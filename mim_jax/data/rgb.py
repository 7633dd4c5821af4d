"""Decoded images of any PIL mode as 8-bit RGB, high bit depths included.

torchvision's default loader calls `convert('RGB')`, which is right for 8-bit
modes (grey, palette, 1-bit, CMYK; alpha dropped) but clips the 16-bit grey
modes at 255: a 16-bit PNG (mode 'I;16', or 'I' in older Pillow) decodes
almost white. Those keep their top 8 bits instead (v >> 8, what Pillow itself
does for 16-bit colour PNGs, libpng's strip_16 and torchvision's uint16 ->
uint8 `to_dtype`), so 16-bit grey and 16-bit colour of one picture agree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Grey modes with up to 16 significant bits ('I' is 32-bit: values are clipped to 16 bits).
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
  """`image` as an 8-bit RGB image (alpha dropped; 16-bit grey keeps its top 8 bits)."""
  if image.mode in SIXTEEN_BIT_GREY_MODES:
    values = np.asarray(image)
    grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
  return image.convert("RGB")
