"""Random-access record sources for grain: TFDS array_record data sets, image
folders, and two data sets built locally from images that ship in wheels: the
demo photographs and scikit-learn's labelled digits.

Every source returned by `get_source` has `__len__`, `__getitem__`,
`has_labels` (whether records carry real class indices) and `num_classes`
(int, or None when unknown or unlabelled), and its records are dicts

    {'image': bytes,   # the encoded file (JPEG/PNG/...), decoded later in grain workers
     'label': int,     # class index (-1 when the data set has no labels)
     'id': str}        # where the record comes from, for warnings about bad images

Sources are pickled into grain's worker processes, so they hold paths and
TFDS readers only, never decoded data. Their `repr` names the data set, split
and size but not the directory, so grain's checkpoint check accepts a resumed
run whose data moved to another path, and rejects one that reads other data.

The data-config fields read here (see `default_data_config`):

    kind        'demo' | 'digits' | 'tfds' | 'image_folder'
    name        TFDS name for kind='tfds', e.g. 'imagenet2012'
    data_dir    TFDS data dir (kind='tfds'; None = TFDS default), the image-folder
                root (kind='image_folder'), or the cache where the demo / digits data
                sets are built (kind='demo'/'digits'; None = ~/.cache/mim_jax/tfds)
    image_key   TFDS feature holding the encoded image ('image')
    label_key   TFDS feature holding the label ('label'; None = unlabelled, label -1)
    digits_size side the 8x8 digits are upsampled to (kind='digits'; 64)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from ml_collections import config_dict
from PIL import Image

from mim_jax.errors import UserError

DEMO_DATASET_NAME = "mim_jax_demo"
DIGITS_DATASET_NAME = "mim_jax_digits"
DEFAULT_DEMO_DIR = "~/.cache/mim_jax/tfds"  # Where kind='demo' and kind='digits' are built.
KINDS = ("demo", "digits", "tfds", "image_folder")
# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError):
  """A user mistake about the data (path, data set, split, config); one line saying how to fix it.

  A `ValueError` (through `mim_jax.errors.UserError`), so CLIs print it without a trace.
  """


def default_data_config() -> config_dict.ConfigDict:
  """All data-config fields with their defaults; config files start from this.

  Fields:
    kind: 'demo' (embedded photos, no download), 'digits' (scikit-learn's digits,
      upsampled, no download), 'tfds' or 'image_folder'.
    name: TFDS data set name (kind='tfds').
    data_dir: TFDS data dir / image-folder root / demo cache dir (see module doc).
    split: training split; eval_split: evaluation split (TFDS slicing such as
      'train[:99%]' works for kind='tfds'/'demo').
    image_key, label_key: TFDS feature names of the encoded image and the label.
    crop_scale: RandomResizedCrop area range as a fraction of the image (MAE: (0.2, 1.0)).
    crop_ratio: RandomResizedCrop aspect-ratio range (sampled in log space).
    flip: random horizontal flip with probability 0.5.
    reduced_jpeg_decode: training decodes a JPEG at 1/2, 1/4 or 1/8 size (libjpeg
      DCT scaling, PIL's `draft`) when its crop still has >= image_size pixels per
      side, i.e. only when the crop is shrunk >= 2x (e.g. 64 or 112 px training on
      ImageNet); faster, same crop boxes and flips, but the pixels differ slightly
      from torchvision's full decode + bicubic resize. Off by default, so the inputs
      match the PyTorch reference exactly. Evaluation always decodes in full.
    decoder: training's JPEG decode and crop resize (mim_jax/data/jpeg.py): 'pil'
      keeps torchvision's pixels bit for bit (JPEGs decoded by libjpeg-turbo when
      that is bit-identical); 'turbo' decodes reduced by DCT scaling while the
      crop keeps >= 2x image_size per side and resizes with OpenCV: same crop
      boxes and flips, ~1.7x the images per core at 224 px, pixels differ by
      ~0.7 gray levels on average (measured, see jpeg.py).
    eval_resize_ratio: evaluation resizes the shorter side to
      int(image_size / eval_resize_ratio) (bicubic), then centre-crops image_size:
      timm's / MAE's `crop_pct` (MAE: 224/256 = 0.875 up to 224 px, 1.0 above).
    digits_size: side (px) the 8x8 digits are upsampled to, bicubic (kind='digits');
      each size is built once as its own TFDS config ('<size>px').
    randaug_magnitude: RandAugment magnitude m in [0, 10] (timm 'rand-m<m>-inc1',
      2 ops of 15 increasing-severity ops, each applied with probability 0.5);
      None = no RandAugment (default; pre-training).
    randaug_mstd: std of the gaussian each op's magnitude is drawn from around m
      (then clipped to [0, 10]); 0 = fixed magnitude; > 100 = uniform in [0, m]
      (timm's 'mstd').
    randaug_num_ops: ops drawn per image, with replacement (timm's 'n').
    color_jitter: brightness, contrast and saturation jitter strength v (factors
      uniform in [max(0, 1 - v), 1 + v], random order: torchvision's
      ColorJitter(v, v, v)); 0 = off. As in timm's create_transform, it is NOT applied
      while RandAugment is on unless force_color_jitter is set.
    force_color_jitter: apply color_jitter after RandAugment too (timm's flag).
    worker_count: grain worker processes per JAX process (0 = in-process).
    prefetch_buffer_size: batches each worker prepares ahead.
    read_threads, read_buffer_size: per-process threads and record buffer that read
      raw records from the source (grain ReadOptions).
  """
  return config_dict.ConfigDict({
      "kind": "demo",
      "name": "imagenet2012",
      "data_dir": config_dict.placeholder(str),
      "split": "train",
      "eval_split": "validation",
      "image_key": "image",
      "label_key": "label",
      "crop_scale": (0.2, 1.0),
      "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
      "flip": True,
      "reduced_jpeg_decode": False,
      "decoder": "pil",
      "eval_resize_ratio": 0.875,
      "digits_size": 64,
      "randaug_magnitude": config_dict.placeholder(float),
      "randaug_mstd": 0.0,
      "randaug_num_ops": 2,
      "color_jitter": 0.0,
      "force_color_jitter": False,
      "worker_count": 2,
      "prefetch_buffer_size": 2,
      "read_threads": 8,
      "read_buffer_size": 128,
  })


def config_value(data_config: Any, key: str) -> Any:
  """`data_config[key]`, or its default when a partial config lacks the field."""
  if key in data_config:
    return data_config[key]
  return default_data_config()[key]


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def get_source(data_config: Any, split: str) -> Sequence[dict[str, Any]]:
  """Returns the random-access source of `split` described by `data_config`.

  Raises:
    DataError: unknown kind, missing directory / data set / split, empty folder,
      or a TFDS data set prepared without random access (tfrecord).
  """
  kind = config_value(data_config, "kind")
  data_dir = config_value(data_config, "data_dir")
  if kind == "demo":
    demo_dir = os.path.expanduser(data_dir or DEFAULT_DEMO_DIR)
    build_demo_dataset(demo_dir)
    return tfds_source(MimJaxDemo(data_dir=demo_dir), split)
  if kind == "digits":
    digits_dir = os.path.expanduser(data_dir or DEFAULT_DEMO_DIR)
    builder = build_digits_dataset(digits_dir, config_value(data_config, "digits_size"))
    # The size in the name: a resumed run must read the same size (grain compares reprs).
    return tfds_source(builder, split, name=f"{builder.name}/{builder.builder_config.name}")
  if kind == "tfds":
    builder = tfds_builder(config_value(data_config, "name"), data_dir)
    return tfds_source(builder, split, image_key=config_value(data_config, "image_key"),
                       label_key=config_value(data_config, "label_key"))
  if kind == "image_folder":
    return ImageFolderSource(data_dir, split)
  raise DataError(f"Unknown data kind {kind!r}: set data.kind to one of {', '.join(KINDS)}.")


# --------------------------------------------------------------------------- #
# TFDS
# --------------------------------------------------------------------------- #


class TfdsSource:
  """A TFDS array_record data source whose records keep the image encoded.

  Wraps `builder.as_data_source(split, decoders={image_key: SkipDecoding()})`,
  which reads without TensorFlow, and reduces records to {'image', 'label', 'id'}.
  `num_classes` comes from the label feature when it is a `ClassLabel`.
  """

  def __init__(self, source: Sequence[dict[str, Any]], *, name: str, split: str,
               image_key: str, label_key: str | None, num_classes: int | None = None):
    self._source = source
    self._name = name
    self._split = split
    self._image_key = image_key
    self._label_key = label_key
    self.num_classes = num_classes

  @property
  def has_labels(self) -> bool:
    """Whether records carry class indices (a label feature is read)."""
    return self._label_key is not None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    label = -1 if self._label_key is None else int(record[self._label_key])
    file_name = record.get("file_name")
    if isinstance(file_name, bytes):
      file_name = file_name.decode("utf-8", "replace")
    return {"image": bytes(record[self._image_key]), "label": label,
            "id": file_name or f"{self._name}/{self._split}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource(name={self._name!r}, split={self._split!r}, num_records={len(self)})"


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder `name` under `data_dir` (None: TFDS default dir).

  Raises:
    DataError: `data_dir` does not exist, `name` is unknown, or not prepared there.
  """
  if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
    raise DataError(f"TFDS data_dir {data_dir!r} does not exist: set data.data_dir to the "
                    f"directory where {name!r} was prepared (prepare it with {_build_command(name, data_dir)}).")
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"Unknown TFDS data set {name!r} (not registered and not found in "
                    f"data_dir {data_dir!r}): check data.name and data.data_dir.") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS data set {name!r} is not prepared at {os.fspath(builder.data_path)!r}: "
                    f"prepare it with {_build_command(name, data_dir)}, or point data.data_dir "
                    "at the directory that holds it.")
  return builder


def _build_command(name: str, data_dir: str | None) -> str:
  """The `tfds build` command that prepares `name` with random access."""
  manual = " --manual_dir=<dir with the downloaded archives>" if name.startswith("imagenet") else ""
  return (f"`tfds build {name} --data_dir={data_dir or '<data_dir>'} "
          f"--file_format=array_record{manual}`")


def tfds_source(builder: tfds.core.DatasetBuilder, split: str, *, image_key: str = "image",
                label_key: str | None = "label", name: str | None = None) -> TfdsSource:
  """Random-access source of `split` of a prepared builder, images left encoded.

  `name` (default: the builder's) is what the source's repr and record ids show.

  Raises:
    DataError: the data set has no random-access format, or no such split/feature.
  """
  info = builder.info
  formats = info.available_file_formats()
  if not formats & set(tfds.core.file_adapters.FileFormat.with_random_access()):
    found = ", ".join(sorted(f.value for f in formats)) or "unknown"
    raise DataError(f"TFDS data set {builder.name!r} at {os.fspath(builder.data_path)!r} is stored "
                    f"as {found}, which has no random access: rebuild it with "
                    f"{_build_command(builder.name, os.fspath(builder.data_dir_root))}.")
  base_split = split.split("[")[0]
  if base_split not in info.splits:
    raise DataError(f"Split {split!r} not in TFDS data set {builder.name!r}: use one of "
                    f"{', '.join(sorted(info.splits))} for data.split / data.eval_split.")
  for key in (image_key, label_key):
    if key is not None and key not in info.features:
      raise DataError(f"Feature {key!r} not in TFDS data set {builder.name!r}: set "
                      f"data.image_key / data.label_key to one of {', '.join(info.features)}.")
  source = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()})
  return TfdsSource(source, name=name or builder.name, split=split, image_key=image_key,
                    label_key=label_key, num_classes=_tfds_num_classes(info, label_key))


def _tfds_num_classes(info: tfds.core.DatasetInfo, label_key: str | None) -> int | None:
  """Classes of the label feature when it is a `ClassLabel` (None otherwise)."""
  if label_key is None:
    return None
  feature = info.features[label_key]
  if isinstance(feature, tfds.features.ClassLabel):
    return feature.num_classes
  return None


# --------------------------------------------------------------------------- #
# Image folder
# --------------------------------------------------------------------------- #


class ImageFolderSource:
  """ImageNet-style folder `<root>/<split>/<class>/**/<image>`; classes sorted by name.

  Files are found like torchvision's ImageFolder (recursive, sorted, extensions
  in IMAGE_EXTENSIONS case-insensitively); records are read lazily from disk.
  """

  has_labels = True

  def __init__(self, root: str | None, split: str):
    split_dir = _split_dir(root, split)
    self.classes = _class_dirs(split_dir)
    if not self.classes:
      raise DataError(f"Image folder {os.fspath(split_dir)!r} has no class sub-folders: "
                      "lay it out as <root>/<split>/<class>/<image>.")
    self._root = split_dir
    self._split = split
    self._files: list[str] = []
    labels = []
    for label, name in enumerate(self.classes):
      files = _image_files(split_dir / name)
      self._files.extend(os.path.relpath(f, split_dir) for f in files)
      labels.extend([label] * len(files))
    if not self._files:
      raise DataError(f"Image folder {os.fspath(split_dir)!r} holds no images with extensions "
                      f"{', '.join(IMAGE_EXTENSIONS)}: check data.data_dir and data.split.")
    self._labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    """Class sub-folders of the split (empty ones included)."""
    return len(self.classes)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._root / self._files[index]
    return {"image": path.read_bytes(), "label": int(self._labels[index]), "id": os.fspath(path)}

  def __repr__(self) -> str:
    return (f"ImageFolderSource(split={self._split!r}, num_classes={len(self.classes)}, "
            f"num_records={len(self)})")


def image_folder_classes(root: str | None, split: str) -> list[str]:
  """Class names of `<root>/<split>`: its sub-folders, sorted (label = position). No file walk.

  Raises:
    DataError: missing root or split folder.
  """
  return _class_dirs(_split_dir(root, split))


def _class_dirs(split_dir: Path) -> list[str]:
  return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _split_dir(root: str | None, split: str) -> Path:
  if root is None:
    raise DataError("data.data_dir is not set: for kind='image_folder' set it to the root "
                    "of <root>/<split>/<class>/<image>.")
  root_path = Path(os.path.expanduser(root))
  if not root_path.is_dir():
    raise DataError(f"Image folder root {root!r} does not exist: set data.data_dir to the "
                    "root of <root>/<split>/<class>/<image>.")
  split_dir = root_path / split
  if not split_dir.is_dir():
    found = sorted(e.name for e in os.scandir(root_path) if e.is_dir())
    listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
    raise DataError(f"Split folder {os.fspath(split_dir)!r} does not exist (found: "
                    f"{listed or 'none'}): fix data.split / data.eval_split.")
  return split_dir


def _image_files(class_dir: Path) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
    dirnames.sort()
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return files


# --------------------------------------------------------------------------- #
# Data sets built locally (no download, no TensorFlow)
# --------------------------------------------------------------------------- #


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
  data_dir = os.path.expanduser(data_dir)
  os.makedirs(data_dir, exist_ok=True)
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
