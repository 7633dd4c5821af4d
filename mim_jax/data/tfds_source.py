"""TFDS data sets read with random access (array_record), images left encoded.

`data.data_dir` may be local or on an object store (gs://...): TFDS and
array_record read both. Reading needs no TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from mim_jax import io
from mim_jax.data.data_config import DataError


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
  if data_dir is not None:
    if not io.is_dir(data_dir):
      raise DataError(f"TFDS data_dir {data_dir!r} is not an existing directory: set "
                      f"data.data_dir to the directory where {name!r} was prepared "
                      f"(prepare it with {_build_command(name, data_dir)}).")
    data_dir = io.absolute(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"Unknown TFDS data set {name!r} (not registered and not found in "
                    f"data_dir {data_dir!r}): check data.name and data.data_dir.") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS data set {name!r} is not prepared at "
                    f"{os.fspath(builder.data_path)!r}: "
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
