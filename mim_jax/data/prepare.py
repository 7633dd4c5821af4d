r"""A resized copy of a data set, written once, so that training decodes fewer pixels.

  python -m mim_jax.data.prepare --kind=image_folder --data_dir=/data/imagenet \
      --out_dir=gs://BUCKET/tensorflow_datasets --out_name=imagenet_256 --short_side=256
  python -m mim_jax.train ... --config.data.kind=tfds --config.data.name=imagenet_256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Reads every split of any source the loader reads (`--kind` image_folder, tfds,
demo or digits, with the data config's `name`, `data_dir`, `image_key`,
`label_key`) and writes a TFDS array_record data set `<out_dir>/<out_name>/1.0.0/`
that `data.kind='tfds'` reads with no TensorFlow: features 'image' (JPEG),
'label' (ClassLabel, when the source has labels) and 'file_name' (the source
record's id, which the loader's warnings name). Each image whose shorter side
is above `--short_side` is resized (Pillow bicubic, antialiased, as
torchvision's `Resize(short_side)`) and re-encoded as JPEG `--quality`; a JPEG
already small enough keeps its bytes, other formats are re-encoded at their
size. The FFCV-style trade: the decoder reads fewer pixels, but every crop then
comes from an image at most `short_side` pixels high or wide. Measured on the
300-image `bench_data` folder (ImageNet sizes; 242 of its images are resized at
256): decode + crop + resize + flip fell from 2.7 to 1.7 ms per image at 224 px
('pil'; 'turbo': 1.6 to 0.75 ms); against the exact crop of the original, the
same relative box of the copy differs by 2.6 / 1.8 / 1.2 gray levels on average
at 224 / 112 / 64 px (at 224 px a crop of the smaller image is enlarged more,
so it is blurrier). An image that cannot be decoded is copied unchanged, so
the record count stays the source's and the loader skips it as before.

Shards of `--shard_size` records are made by `--workers` processes and written
whole (local: renamed into place; gs://: one upload each), local or gs://
through mim_jax/io.py. `prepare.json` lists the settings and the finished
shards: an interrupted run started again with the same flags redoes only the
missing shards (other flags are refused); the TFDS metadata is written last,
so the data set is readable only once complete. Progress and the time left
are printed after each shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags, logging
from array_record.python import array_record_module
from PIL import Image

from mim_jax import cli
from mim_jax import io as mio
from mim_jax.data import jpeg, sources, transforms
from mim_jax.data.sources import DataError

VERSION = "1.0.0"
MANIFEST = "prepare.json"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")  # a TFDS data set name


@dataclasses.dataclass(frozen=True)
class Resize:
  """How each image is rewritten: shorter side at most `short_side` (0: any), JPEG `quality`."""

  short_side: int = 256
  quality: int = 90

  def __post_init__(self):
    if self.short_side < 0 or not 1 <= self.quality <= 100:
      raise DataError(f"--short_side {self.short_side} / --quality {self.quality} invalid: use "
                      "short_side >= 0 (0 keeps sizes) and quality in [1, 100].")

  def __call__(self, data: bytes) -> bytes:
    """The record's new encoded image (its own bytes when small enough already or unreadable)."""
    size = jpeg.rgb_jpeg_size(data)
    if size is not None and (self.short_side == 0 or min(size) <= self.short_side):
      return data  # no second JPEG compression
    try:
      image = transforms.decode_rgb(data)
    except Exception:  # pylint: disable=broad-exception-caught  # The loader skips it later.
      return data
    width, height = image.size
    if self.short_side and min(width, height) > self.short_side:
      if width <= height:
        new_size = (self.short_side, int(self.short_side * height / width))
      else:
        new_size = (int(self.short_side * width / height), self.short_side)
      image = image.resize(new_size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=self.quality)
    return buffer.getvalue()


def prepare(data_config: Any, *, out_dir: str, out_name: str, splits: Sequence[str] | None = None,
            resize: Resize = Resize(), shard_size: int = 1024, workers: int = 0,
            log: Callable[[str], None] = print) -> str:
  """Writes the resized copy (see the module doc); returns `<out_dir>/<out_name>/1.0.0`.

  Args:
    data_config: the source, as a data config (kind, name, data_dir, image_key, label_key).
    out_dir: TFDS data dir of the copy (local or gs://).
    out_name: TFDS name of the copy (lower case, digits, '_'; not a registered TFDS name).
    splits: splits to copy; None = all of the source's.
    resize: short side and JPEG quality.
    shard_size: records per array_record shard.
    workers: processes that make the shards; 0 = this process.
    log: where progress lines go.

  Raises:
    DataError: a bad name or setting, a source error, or `out_dir` holding an
      unfinished copy made with other settings.
  """
  _check_name(out_name)
  if shard_size < 1 or workers < 0:
    raise DataError(f"--shard_size {shard_size} / --workers {workers} invalid: use "
                    "shard_size >= 1 and workers >= 0.")
  target = mio.join(out_dir, out_name, VERSION)
  if mio.exists(mio.join(target, "dataset_info.json")):
    log(f"{target} is already prepared.")
    return target
  splits = list(splits or source_splits(data_config))
  split_sources = {split: sources.get_source(data_config, split) for split in splits}
  settings = {"source": {s: repr(src) for s, src in split_sources.items()},
              "short_side": resize.short_side, "quality": resize.quality,
              "shard_size": shard_size}
  done = _resume(target, settings)
  tasks = []
  for split, source in split_sources.items():
    count = -(-len(source) // shard_size)
    for index in range(count):
      name = f"{out_name}-{split}.array_record-{index:05d}-of-{count:05d}"
      if name not in done:
        tasks.append(_Shard(split, name, index * shard_size,
                            min(len(source), (index + 1) * shard_size)))
  features = _features(data_config, split_sources)
  total = sum(task.end - task.start for task in tasks)
  log(f"Preparing {out_name} in {target}: {len(tasks)} shards, {total} images "
      f"({len(done)} shards already there), shorter side <= {resize.short_side}, "
      f"quality {resize.quality}, {workers} workers.")
  state = (split_sources, features, resize, target)
  start, written = time.perf_counter(), 0
  for finished, (shard, num_bytes) in enumerate(_run(tasks, state, workers), start=1):
    done[shard.name] = [shard.end - shard.start, num_bytes]
    mio.write_text(mio.join(target, MANIFEST), json.dumps({**settings, "done": done}))
    written += shard.end - shard.start
    rate = written / (time.perf_counter() - start)
    log(f"  {finished}/{len(tasks)} shards, {written}/{total} images, {rate:.0f} images/s, "
        f"{(total - written) / rate / 60:.1f} min left")
  split_infos = []
  for split in splits:
    names = sorted(name for name in done if name.startswith(f"{out_name}-{split}.array_record"))
    split_infos.append(tfds.core.SplitInfo(name=split,
                                           shard_lengths=[done[n][0] for n in names],
                                           num_bytes=sum(done[n][1] for n in names)))
  tfds.folder_dataset.write_metadata(
      data_dir=target, features=features, split_infos=split_infos, check_data=False,
      description=f"{out_name}: {settings['source']} with the shorter side <= "
                  f"{resize.short_side} px, JPEG quality {resize.quality} (mim_jax.data.prepare).")
  log(f"Done: read it with data.kind='tfds', data.name='{out_name}', data.data_dir='{out_dir}'.")
  return target


def source_splits(data_config: Any) -> list[str]:
  """Every split of the source: an image folder's sub-folders, a TFDS data set's splits."""
  kind = sources.config_value(data_config, "kind")
  data_dir = sources.config_value(data_config, "data_dir")
  if kind == "image_folder":
    if data_dir is None or not mio.is_dir(data_dir):
      raise DataError(f"Image folder root {data_dir!r} does not exist: set --data_dir to the "
                      "root of <root>/<split>/<class>/<image>.")
    return [name for name in mio.listdir(data_dir) if mio.is_dir(mio.join(data_dir, name))]
  if kind == "tfds":
    builder = sources.tfds_builder(sources.config_value(data_config, "name"), data_dir)
    return sorted(builder.info.splits)
  return ["train", "validation"]  # demo, digits


@dataclasses.dataclass(frozen=True)
class _Shard:
  split: str
  name: str
  start: int
  end: int


_worker_state: tuple[Any, ...] | None = None


def _init_worker(state: tuple[Any, ...]) -> None:
  global _worker_state
  _worker_state = state


def _run(tasks: list[_Shard], state: tuple[Any, ...], workers: int):
  """Yields (shard, bytes) as shards finish, in this process or in `workers` processes."""
  if not workers:
    _init_worker(state)
    yield from map(_write_shard, tasks)
    return
  with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (state,)) as pool:
    yield from pool.imap_unordered(_write_shard, tasks)


def _write_shard(shard: _Shard) -> tuple[_Shard, int]:
  """Makes one shard locally, then puts it in place whole; returns it and its serialized bytes."""
  split_sources, features, resize, target = _worker_state
  source = split_sources[shard.split]
  has_labels = "label" in features
  num_bytes = 0
  with tempfile.TemporaryDirectory(prefix="mim_jax_prepare_") as local:
    path = os.path.join(local, shard.name)  # our own temporary file, not a user path
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for index in range(shard.start, shard.end):
      record = source[index]
      example = {"image": resize(record["image"]), "file_name": str(record["id"])}
      if has_labels:
        example["label"] = record["label"]
      serialized = features.serialize_example(example)
      writer.write(serialized)
      num_bytes += len(serialized)
    writer.close()
    with open(path, "rb") as f:
      mio.write_bytes(mio.join(target, shard.name), f.read())
  return shard, num_bytes


def _features(data_config: Any, split_sources: dict[str, Any]) -> tfds.features.FeaturesDict:
  source = next(iter(split_sources.values()))
  features = {"image": tfds.features.Image(encoding_format="jpeg"),
              "file_name": tfds.features.Text()}
  if source.has_labels:
    names = _class_names(data_config, split_sources)
    features["label"] = (tfds.features.ClassLabel(names=names) if names else
                         tfds.features.ClassLabel(num_classes=source.num_classes))
  return tfds.features.FeaturesDict(features)


def _class_names(data_config: Any, split_sources: dict[str, Any]) -> list[str] | None:
  """The label names of the source (None: unknown, only their number)."""
  source = next(iter(split_sources.values()))
  if isinstance(source, sources.ImageFolderSource):
    for split, other in split_sources.items():
      if other.classes != source.classes:
        raise DataError(f"Split {split!r} has other class folders than split "
                        f"{next(iter(split_sources))!r}, so their labels would disagree: give "
                        "all splits the same class folders (empty ones are fine).")
    return list(source.classes)
  if sources.config_value(data_config, "kind") == "tfds":
    builder = sources.tfds_builder(sources.config_value(data_config, "name"),
                                   sources.config_value(data_config, "data_dir"))
    feature = builder.info.features[sources.config_value(data_config, "label_key")]
    return list(getattr(feature, "names", None) or []) or None
  return None


def _check_name(name: str) -> None:
  if not _NAME_PATTERN.match(name or ""):
    raise DataError(f"--out_name {name!r} is not a TFDS data set name: use lower-case letters, "
                    "digits and '_', starting with a letter (e.g. imagenet_256).")
  if name in tfds.list_builders(with_community_datasets=False):
    raise DataError(f"--out_name {name!r} is a registered TFDS data set, whose own builder "
                    f"would read the copy: pick another name (e.g. {name}_256).")


def _resume(target: str, settings: dict[str, Any]) -> dict[str, list[int]]:
  """Shards an earlier run with the same settings finished: {file name: [records, bytes]}."""
  manifest = mio.join(target, MANIFEST)
  if not mio.exists(manifest):
    return {}
  earlier = json.loads(mio.read_text(manifest))
  done = earlier.pop("done", {})
  if earlier != settings:
    changed = sorted(key for key in settings if earlier.get(key) != settings[key])
    raise DataError(f"{target} holds an unfinished copy made with other settings "
                    f"({', '.join(changed)} differ): rerun with the same flags to finish it, "
                    "or delete it / pick another --out_name.")
  return done


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #

def define_flags() -> None:
  """The command line's flags; defined only when run as a program, since other
  commands (analyze) use the same names and one process may import both."""
  flags.DEFINE_enum("kind", "image_folder", list(sources.KINDS), "Source kind.")
  flags.DEFINE_string("name", None, "Source TFDS name (kind=tfds).")
  flags.DEFINE_string("data_dir", None, "Source image-folder root / TFDS data dir.")
  flags.DEFINE_string("image_key", "image", "Source TFDS image feature.")
  flags.DEFINE_string("label_key", "label", "Source TFDS label feature ('' = none).")
  flags.DEFINE_list("splits", None, "Splits to copy (default: all).")
  flags.DEFINE_string("out_dir", None, "TFDS data dir of the copy (local or gs://).")
  flags.DEFINE_string("out_name", None, "TFDS name of the copy, e.g. imagenet_256.")
  flags.DEFINE_integer("short_side", 256, "Shorter side at most this (0 = keep).")
  flags.DEFINE_integer("quality", 90, "JPEG quality of re-encoded images.")
  flags.DEFINE_integer("shard_size", 1024, "Records per array_record shard.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes (0 = this one).")
  flags.mark_flags_as_required(["out_dir", "out_name"])


def main(argv: list[str]) -> None:
  del argv
  flag = flags.FLAGS
  data_config = sources.default_data_config()
  data_config.update(kind=flag.kind, data_dir=flag.data_dir, image_key=flag.image_key,
                     label_key=flag.label_key or None)
  if flag.name:
    data_config.name = flag.name
  logging.set_verbosity(logging.WARNING)
  cli.run_reporting_user_errors(lambda: prepare(
      data_config, out_dir=flag.out_dir, out_name=flag.out_name, splits=flag.splits,
      resize=Resize(flag.short_side, flag.quality), shard_size=flag.shard_size,
      workers=flag.workers))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
