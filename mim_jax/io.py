"""Every path a user gives, local or in a bucket (`gs://...`): one small layer over etils.epath.

The rest of mim_jax never calls `open`, `os.path`, `os.makedirs` or `shutil` on a
path that came from a user (workdir, teacher, init, data_dir, analysis and
converter inputs and outputs); it calls these functions, which take `str` or
path-like values and work for local paths and for any scheme epath supports
(`gs://` needs the `gcs` extra: gcsfs).

Writes are all-or-nothing: a local file is written next to its final name and
renamed; an object-store upload is atomic by itself. Object stores cannot
append: `write_bytes` replaces the whole object.

Every failure that is the user's to fix (no such file, no permission, no GCS
client installed) is a `UserError` whose one-line message names the path.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from mim_jax.errors import UserError

PathLike = str | os.PathLike


class StorageError(UserError):
  """A path that cannot be read or written; the message names it and what to do."""


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://bucket/...`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute and user-expanded; URLs unchanged (orbax needs absolute)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if path.count("/") > 3 else path
  return os.path.abspath(os.path.expanduser(path))


def to_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` (a local path is expanded and made absolute)."""
  path = absolute(path)
  if is_remote(path):
    _check_client(path)
  return epath.Path(path)


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, for local paths and URLs alike."""
  if is_remote(path):
    return "/".join([os.fspath(path).rstrip("/"), *(part.strip("/") for part in parts)])
  return os.path.join(os.fspath(path), *parts)


def name(path: PathLike) -> str:
  """The last component of `path` ('' for a bucket root)."""
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: PathLike) -> str:
  """The directory holding `path`."""
  text = os.fspath(path).rstrip("/")
  if is_remote(text):
    return text.rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(os.path.expanduser(text)))


# ----------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------
def exists(path: PathLike) -> bool:
  with _reported(path, "read"):
    return to_path(path).exists()


def is_dir(path: PathLike) -> bool:
  with _reported(path, "read"):
    return to_path(path).is_dir()


def is_file(path: PathLike) -> bool:
  with _reported(path, "read"):
    return to_path(path).is_file()


def listdir(path: PathLike) -> list[str]:
  """Sorted names of the entries of directory `path`."""
  with _reported(path, "list"):
    return sorted(entry.name for entry in to_path(path).iterdir())


def walk_files(path: PathLike) -> Iterator[tuple[str, list[str]]]:
  """(directory, sorted file names) for `path` and every directory below it, top down.

  Directories are spelled as `absolute(path)` is: with their scheme when remote
  (fsspec's walk drops it), and local symbolic links to directories are
  followed (as torchvision's ImageFolder does).
  """
  top = absolute(path)
  with _reported(path, "list"):
    if is_remote(top):
      scheme = top.split("://", 1)[0] + "://"
      walk = ((os.fspath(d) if "://" in os.fspath(d) else scheme + os.fspath(d), dirs, files)
              for d, dirs, files in to_path(top).walk())
    else:
      walk = os.walk(top, followlinks=True)
    for directory, dirnames, filenames in walk:
      dirnames.sort()
      yield os.fspath(directory), sorted(filenames)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def read_bytes(path: PathLike) -> bytes:
  with _reported(path, "read"):
    return to_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  with _reported(path, "read"):
    return to_path(path).read_text(encoding="utf-8")


@contextlib.contextmanager
def open_read(path: PathLike) -> Iterator[IO[bytes]]:
  """A binary file object for reading (seekable: np.load and torch.load accept it)."""
  with _reported(path, "read"):
    with to_path(path).open("rb") as f:
      yield f


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def makedirs(path: PathLike) -> None:
  """Creates directory `path` and its parents (object stores have no directories: no-op)."""
  with _reported(path, "create"):
    to_path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path`, creating parent directories; all or nothing."""
  target = to_path(path)
  with _reported(path, "write"):
    if is_remote(path):
      target.write_bytes(data)
      return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
      partial.write_bytes(data)
      os.replace(partial, target)
    finally:
      if partial.exists():
        partial.unlink()


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: PathLike) -> None:
  """Deletes the file `path` if it exists."""
  with _reported(path, "delete"):
    target = to_path(path)
    if target.exists():
      target.unlink()


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def _check_client(path: str) -> None:
  """A `gs://` path needs gcsfs (epath's GCS backend without TensorFlow)."""
  if path.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise StorageError(f"{path!r} is on Google Cloud Storage, which needs the gcs extra: "
                         f"pip install -e '.[gcs]'") from None


@contextlib.contextmanager
def _reported(path: PathLike, action: str) -> Iterator[None]:
  """Turns the OS's / the object store's error about `path` into one line."""
  try:
    yield
  except UserError:
    raise
  except FileNotFoundError:
    raise StorageError(f"cannot {action} {os.fspath(path)!r}: no such file or directory"
                       ) from None
  except PermissionError as error:
    raise StorageError(f"cannot {action} {os.fspath(path)!r}: permission denied "
                       f"({_first_line(error)})") from None
  except (IsADirectoryError, NotADirectoryError) as error:
    raise StorageError(f"cannot {action} {os.fspath(path)!r}: {_first_line(error)}") from None
  except OSError as error:
    raise StorageError(f"cannot {action} {os.fspath(path)!r}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def describe(value: Any) -> str:
  """A path for messages: the string as given."""
  return repr(os.fspath(value))
