"""ImageNet-style image folders `<root>/<split>/<class>/**/<image>`, local or on an object store.

Files are found as torchvision's `ImageFolder` finds them: class = sub-folder
of the split (sorted by name: label = position), images below it recursively
(directories top down, names sorted, local symbolic links followed), extensions
in IMAGE_EXTENSIONS compared case-insensitively. Listing and reading go
through `mim_jax.io`, so `data.data_dir` may be a local path or a bucket
(`gs://bucket/imagenet`); the grain workers read each record's bytes when
they need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mim_jax import io
from mim_jax.data.data_config import DataError

# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSource:
  """The images of `<root>/<split>`, labelled by class folder; records are read lazily.

  Records: {'image': the file's bytes, 'label': class index, 'id': the file's path}.
  """

  has_labels = True

  def __init__(self, root: str | None, split: str):
    split_dir = _split_dir(root, split)
    self.classes = _sub_folders(split_dir)
    if not self.classes:
      raise DataError(f"Image folder {split_dir!r} has no class sub-folders: lay it out as "
                      "<root>/<split>/<class>/<image>.")
    self._root = split_dir
    self._split = split
    self._files: list[str] = []  # Relative to the split folder.
    labels = []
    for label, name in enumerate(self.classes):
      files = _image_files(split_dir, name)
      self._files.extend(files)
      labels.extend([label] * len(files))
    if not self._files:
      raise DataError(f"Image folder {split_dir!r} holds no images with extensions "
                      f"{', '.join(IMAGE_EXTENSIONS)}: check data.data_dir and data.split.")
    self._labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    """Class sub-folders of the split (empty ones included)."""
    return len(self.classes)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = io.join(self._root, self._files[index])
    return {"image": io.read_bytes(path), "label": int(self._labels[index]), "id": path}

  def __repr__(self) -> str:
    # No directory: a resumed run may read the same data from another place.
    return (f"ImageFolderSource(split={self._split!r}, num_classes={len(self.classes)}, "
            f"num_records={len(self)})")


def image_folder_classes(root: str | None, split: str) -> list[str]:
  """Class names of `<root>/<split>`: its sub-folders, sorted (label = position). No file walk.

  Raises:
    DataError: missing root or split folder.
  """
  return _sub_folders(_split_dir(root, split))


def _sub_folders(path: str) -> list[str]:
  """Sorted names of the directories in directory `path`."""
  return [name for name in io.listdir(path) if io.is_dir(io.join(path, name))]


def _split_dir(root: str | None, split: str) -> str:
  """`<root>/<split>` (absolute when local), checked to exist."""
  if root is None:
    raise DataError("data.data_dir is not set: for kind='image_folder' set it to the root "
                    "of <root>/<split>/<class>/<image>.")
  if not io.is_dir(root):
    raise DataError(f"Image folder root {root!r} does not exist or is not a directory: set "
                    "data.data_dir to the root of <root>/<split>/<class>/<image>.")
  split_dir = io.join(io.absolute(root), split)
  if not io.is_dir(split_dir):
    found = _sub_folders(io.absolute(root))
    listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
    raise DataError(f"Split folder {split_dir!r} does not exist (found: {listed or 'none'}): "
                    "fix data.split / data.eval_split.")
  return split_dir


def _image_files(split_dir: str, class_name: str) -> list[str]:
  """The images below `<split_dir>/<class_name>`, as paths relative to `split_dir`."""
  files = []
  for directory, names in io.walk_files(io.join(split_dir, class_name)):
    relative = _relative(directory, split_dir)
    files.extend(f"{relative}/{name}" for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS))
  return files


def _relative(path: str, start: str) -> str:
  """`path` (below directory `start`, both as `mim_jax.io` spells them) relative to `start`."""
  prefix = start.rstrip("/") + "/"
  if not path.startswith(prefix):
    raise RuntimeError(f"listing {start!r} returned {path!r}, which is not below it")
  return path[len(prefix):]
