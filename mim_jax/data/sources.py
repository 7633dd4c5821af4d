"""Random-access record sources for grain, chosen by the data config's `kind`.

  * 'tfds': a TFDS data set prepared as array_record (`tfds_source.py`);
  * 'image_folder': `<root>/<split>/<class>/<image>` (`image_folder.py`);
  * 'demo' / 'digits': data sets built locally from images that ship in
    installed wheels (`local_datasets.py`).

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

The data-config fields read here (see `default_data_config`): kind, name,
data_dir (local or gs://... for 'tfds' and 'image_folder'; a local cache for
'demo' and 'digits'), image_key, label_key, digits_size.

This module also re-exports the names other modules import from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mim_jax.data.data_config import DataError, config_value, default_data_config
from mim_jax.data.image_folder import IMAGE_EXTENSIONS, ImageFolderSource, image_folder_classes
from mim_jax.data.local_datasets import (DEFAULT_DEMO_DIR, DEMO_CLASSES, DEMO_DATASET_NAME,
                                         DIGITS_CLASSES, DIGITS_DATASET_NAME, MimJaxDemo,
                                         MimJaxDigits, build_demo_dataset,
                                         build_digits_dataset, cache_dir, demo_photos)
from mim_jax.data.tfds_source import TfdsSource, tfds_builder, tfds_source

__all__ = [
    "DEFAULT_DEMO_DIR", "DEMO_CLASSES", "DEMO_DATASET_NAME", "DIGITS_CLASSES",
    "DIGITS_DATASET_NAME", "IMAGE_EXTENSIONS", "KINDS", "DataError", "ImageFolderSource",
    "MimJaxDemo", "MimJaxDigits", "TfdsSource", "build_demo_dataset", "build_digits_dataset",
    "config_value", "default_data_config", "demo_photos", "get_source", "image_folder_classes",
    "tfds_builder", "tfds_source",
]

KINDS = ("demo", "digits", "tfds", "image_folder")


def get_source(data_config: Any, split: str) -> Sequence[dict[str, Any]]:
  """Returns the random-access source of `split` described by `data_config`.

  Raises:
    DataError: unknown kind, missing directory / data set / split, empty folder,
      or a TFDS data set prepared without random access (tfrecord).
    StorageError: a data directory that cannot be listed or read.
  """
  kind = config_value(data_config, "kind")
  data_dir = config_value(data_config, "data_dir")
  if kind == "demo":
    demo_dir = cache_dir(data_dir, "kind='demo'")
    build_demo_dataset(demo_dir)
    return tfds_source(MimJaxDemo(data_dir=demo_dir), split)
  if kind == "digits":
    builder = build_digits_dataset(cache_dir(data_dir, "kind='digits'"),
                                   config_value(data_config, "digits_size"))
    # The size in the name: a resumed run must read the same size (grain compares reprs).
    return tfds_source(builder, split, name=f"{builder.name}/{builder.builder_config.name}")
  if kind == "tfds":
    builder = tfds_builder(config_value(data_config, "name"), data_dir)
    return tfds_source(builder, split, image_key=config_value(data_config, "image_key"),
                       label_key=config_value(data_config, "label_key"))
  if kind == "image_folder":
    return ImageFolderSource(data_dir, split)
  raise DataError(f"Unknown data kind {kind!r}: set data.kind to one of {', '.join(KINDS)}.")
