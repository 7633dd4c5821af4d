"""Data sets built locally from images that ship in installed wheels: no download, no TensorFlow.

* `MimJaxDemo` ('demo'): 2,000 / 200 JPEG crops of ten photographs bundled in
  scikit-image and scikit-learn, labelled by photo.
* `MimJaxDigits` ('digits'): scikit-learn's 1,797 handwritten digits upsampled
  to a chosen side, a small real labelled set for fine-tuning.

Both are TFDS array_record data sets built once into a local cache directory
(`DEFAULT_DEMO_DIR` unless data.data_dir names another) and read like any
TFDS data set afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from mim_jax import io as mim_io
from mim_jax.data.data_config import DataError

DEMO_DATASET_NAME = "mim_jax_demo"
DIGITS_DATASET_NAME = "mim_jax_digits"
DEFAULT_DEMO_DIR = "~/.cache/mim_jax/tfds"  # Where kind='demo' and kind='digits' are built.


def cache_dir(data_dir: str | None, what: str) -> str:
  """The local directory `what` (e.g. "kind='demo'") is built in: `data_dir` or DEFAULT_DEMO_DIR.

  Raises:
    DataError: `data_dir` is a URL (the cache is built with local file locks).
  """
  if data_dir is not None and mim_io.is_remote(data_dir):
    raise DataError(f"data.data_dir {data_dir!r} is remote, but {what} is built in a local "
                    "cache directory: set data.data_dir to a local directory, or leave it "
                    f"unset for {DEFAULT_DEMO_DIR}.")
  return mim_io.absolute(data_dir or DEFAULT_DEMO_DIR)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders whose data ship inside installed wheels: array_record by default.

  Subclasses define `name`, `VERSION`, `_info`, `_split_generators`; `prepare_once`
  builds them.
  """

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default looks the module up through `importlib_resources`, which
    # it only installs on Python < 3.9, and so fails for builders outside TFDS.
    return epath.Path(__file__)


def prepare_once(builder_class: type[LocalBuilder], data_dir: str, **kwargs: Any) -> LocalBuilder:
  """`builder_class(data_dir=data_dir, **kwargs)`, built first unless it already is.

  Idempotent. Concurrent callers on one machine serialise on a lock file (one per
  data set name); TFDS writes into an `incomplete.*` directory renamed into place
  at the end, so an interrupted build is never mistaken for a finished one. The
  builder returned is made after the build, so it reads the finished data set.
  """
  data_dir = cache_dir(data_dir, f"the {builder_class.name} data set")
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as error:
    raise DataError(f"Cannot create the data cache directory {data_dir!r} "
                    f"({error.strerror or error}): set data.data_dir to a writable local "
                    "directory.") from None
  with _file_lock(os.path.join(data_dir, f".{builder_class.name}.lock")):
    builder = builder_class(data_dir=data_dir, **kwargs)
    if not builder.is_prepared():
      logging.info("Building the %s data set in %s", builder.name, os.fspath(builder.data_path))
      builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  return builder_class(data_dir=data_dir, **kwargs)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  with open(path, "a", encoding="utf-8") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- #
# The embedded demo data set
# --------------------------------------------------------------------------- #

# Colour photographs bundled in the scikit-image wheel (no pooch download).
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "retina")
DEMO_CLASSES = (*_SKIMAGE_PHOTOS, "motorcycle", "china", "flower")
_DEMO_SPLITS = {"train": (2000, 0), "validation": (200, 1)}  # split: (size, seed offset)
_DEMO_SEED = 20240601
_DEMO_MAX_PHOTO_SIDE = 512      # photos are downscaled to this first (speed)
_DEMO_OUT_SIDE = (160, 256)     # longer side of each stored crop, uniform
_DEMO_AREA = (0.1, 1.0)         # crop area as a fraction of the photo
_DEMO_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class MimJaxDemo(LocalBuilder, skip_registration=True):
  """Crops of ten photographs shipped inside scikit-image / scikit-learn; label = photo.

  Built locally in seconds without TensorFlow or network; deterministic.
  """

  name = DEMO_DATASET_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "2,000 train / 200 validation JPEG crops of 10 photographs."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=DEMO_CLASSES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download.
    photos = demo_photos()
    return {split: self._generate_examples(photos, size, _DEMO_SEED + offset)
            for split, (size, offset) in _DEMO_SPLITS.items()}

  def _generate_examples(self, photos: list[np.ndarray], size: int,
                         seed: int) -> Iterator[tuple[int, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    for index in range(size):
      label = index % len(photos)
      yield index, {"image": _demo_crop_jpeg(photos[label], rng), "label": label}


def demo_photos() -> list[np.ndarray]:
  """The demo photographs (uint8 RGB), in DEMO_CLASSES order, downscaled for speed."""
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel

  photos = {name: getattr(skimage_data, name)() for name in _SKIMAGE_PHOTOS}
  photos["motorcycle"] = skimage_data.stereo_motorcycle()[0]
  sample = load_sample_images()
  photos.update({Path(f).stem: img for f, img in zip(sample.filenames, sample.images)})
  return [_downscale(photos[name]) for name in DEMO_CLASSES]


def _downscale(photo: np.ndarray) -> np.ndarray:
  image = Image.fromarray(photo).convert("RGB")
  image.thumbnail((_DEMO_MAX_PHOTO_SIDE, _DEMO_MAX_PHOTO_SIDE), Image.Resampling.LANCZOS)
  return np.asarray(image)


def _demo_crop_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
  """A random crop of `photo` (area/ratio from _DEMO_AREA/_DEMO_RATIO), resized, as JPEG."""
  height, width = photo.shape[:2]
  area = height * width * rng.uniform(*_DEMO_AREA)
  ratio = np.exp(rng.uniform(*np.log(_DEMO_RATIO)))
  w = int(min(width, max(16, round(np.sqrt(area * ratio)))))
  h = int(min(height, max(16, round(np.sqrt(area / ratio)))))
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  side = int(rng.integers(_DEMO_OUT_SIDE[0], _DEMO_OUT_SIDE[1] + 1))
  scale = side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  crop = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  crop.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def build_demo_dataset(data_dir: str) -> None:
  """Builds the demo data set under `data_dir` unless it is already built (see `prepare_once`)."""
  prepare_once(MimJaxDemo, data_dir)


# --------------------------------------------------------------------------- #
# scikit-learn's digits, upsampled: a small real labelled set for fine-tuning
# --------------------------------------------------------------------------- #

DIGITS_CLASSES = tuple(str(digit) for digit in range(10))
DIGITS_VALIDATION_EVERY = 5   # The 5th, 10th, ... image of each class is validation.
DIGITS_SIZES = (32, 64, 96, 128, 224)  # Predefined configs; any other size works too.
_DIGITS_MAX_VALUE = 16        # load_digits pixels are counts 0..16.


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """A `MimJaxDigits` config: the side the 8x8 digits are upsampled to."""

  image_size: int = 64

  @classmethod
  def for_size(cls, image_size: int) -> DigitsConfig:
    """The config named '<image_size>px'."""
    return cls(name=f"{image_size}px", image_size=image_size,
               description=f"8x8 digits upsampled to {image_size}x{image_size} (bicubic), RGB.")


class MimJaxDigits(LocalBuilder, skip_registration=True):
  """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) upsampled bicubically, RGB.

  Split fixed and stratified: within each class, in load_digits order, every
  DIGITS_VALIDATION_EVERY-th image is validation (355), the rest train (1,442).
  Pixels 0..16 become round(v * 255 / 16): white digits on black. Stored as PNG
  with the image's position in load_digits ('index'). Deterministic, no download.
  """

  name = DIGITS_DATASET_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "1,442 train / 355 validation upsampled digits."}
  BUILDER_CONFIGS = [DigitsConfig.for_size(size) for size in DIGITS_SIZES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "label": tfds.features.ClassLabel(names=DIGITS_CLASSES),
            "index": tfds.features.Scalar(np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # Nothing to download.
    images, labels = digits_arrays()
    splits = digits_split_indices(labels)
    return {split: self._generate_examples(images, labels, indices)
            for split, indices in splits.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    size = self.builder_config.image_size
    for index in indices:
      yield int(index), {"image": upsampled_digit_png(images[index], size),
                         "label": int(labels[index]), "index": int(index)}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: (1797, 8, 8) float pixels in [0, 16] and int labels 0..9."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  return digits.images, digits.target.astype(np.int64)


def digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """{'train', 'validation'} -> indices: stratified, every DIGITS_VALIDATION_EVERY-th per class."""
  rank = np.empty(len(labels), np.int64)  # Position of each image within its class.
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank[members] = np.arange(len(members))
  validation = rank % DIGITS_VALIDATION_EVERY == DIGITS_VALIDATION_EVERY - 1
  return {"train": np.flatnonzero(~validation), "validation": np.flatnonzero(validation)}


def upsampled_digit_png(image: np.ndarray, size: int) -> bytes:
  """An 8x8 digit (values 0..16) as a (size, size) RGB PNG, upsampled bicubically."""
  grey = np.round(image * (255 / _DIGITS_MAX_VALUE)).astype(np.uint8)
  upsampled = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  upsampled.convert("RGB").save(buffer, format="PNG")
  return buffer.getvalue()


def build_digits_dataset(data_dir: str, image_size: int) -> MimJaxDigits:
  """The digits data set upsampled to `image_size`, built under `data_dir` unless it is already.

  Raises:
    DataError: `image_size` not an integer in [8, 1024].
  """
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not (
      8 <= image_size <= 1024):
    raise DataError(f"data.digits_size {image_size!r} invalid: use an integer side in [8, 1024] "
                    "(the digits are 8x8, upsampled).")
  name = f"{image_size}px"
  # A predefined config goes by name: the builder is re-made from its arguments when
  # unpickled in a grain worker, where a config object would not be the class's own.
  config = name if name in MimJaxDigits.builder_configs else DigitsConfig.for_size(int(image_size))
  return prepare_once(MimJaxDigits, data_dir, config=config)
