"""Every path a user gives, local or in a bucket (`gs://...`): one small layer over etils.epath.

The rest of mim_jax never calls `open`, `os.path`, `os.makedirs` or `shutil` on a
path that came from a user (workdir, teacher, init, data_dir, analysis and
converter inputs and outputs); it calls these functions, which take `str` or
path-like values and work for local paths and for any scheme epath supports
(`gs://` needs the `gcs` extra: gcsfs).

Writes are all-or-nothing: a local file is written next to its final name and
renamed; an object-store upload is atomic by itself. Object stores cannot
append: `write_bytes` replaces the whole object, and `AppendableFile` appends in
place on a local disk but rewrites the object on a store.

Every failure that is the user's to fix (no such file or bucket, no permission,
no GCS client installed, no GCS credentials) is a `StorageError` whose one-line
message names the path and what to do.
"""

from __future__ import annotations

import contextlib
import functools
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


def create_new(path: PathLike, data: bytes) -> bool:
  """Writes `data` to `path` only if nothing is there; returns whether it did.

  Atomic on a local disk (O_EXCL) and on GCS (a create-only precondition): of
  several processes racing, exactly one gets True. Other object stores check,
  then write.
  """
  target = to_path(path)
  with _reported(path, "create"):
    if not is_remote(path):
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(descriptor, "wb") as f:
        f.write(data)
      return True
    filesystem, inner = _filesystem(path)
    if os.fspath(path).startswith("gs://"):
      try:
        filesystem.pipe_file(inner, data, mode="create")
      except FileExistsError:
        return False
      return True
    if filesystem.exists(inner):
      return False
    filesystem.pipe_file(inner, data)
    return True


def remove(path: PathLike) -> None:
  """Deletes the file `path` if it exists."""
  with _reported(path, "delete"):
    target = to_path(path)
    if target.exists():
      target.unlink()


def move(source: PathLike, destination: PathLike) -> None:
  """Moves file or directory tree `source` to `destination` (a rename on a local disk;
  copy then delete, object by object, on an object store)."""
  with _reported(source, "move"):
    if not is_remote(source) and not is_remote(destination):
      to_path(destination).parent.mkdir(parents=True, exist_ok=True)
      os.replace(absolute(source), absolute(destination))
      return
    filesystem, inner = _filesystem(source)
    _, inner_destination = _filesystem(destination)
    filesystem.mv(inner, inner_destination, recursive=True)


class AppendableFile:
  """A file that grows by appends: `metrics.jsonl`, TensorBoard event files.

  On a local disk the bytes are appended and flushed at once. Object stores
  cannot append, so there the whole content is kept in memory and the object
  is rewritten at every `append` (callers append once per logging interval).
  """

  def __init__(self, path: PathLike, initial: bytes = b""):
    """Starts the file with `initial`, replacing whatever was at `path`."""
    self.path = os.fspath(path)
    self._content = bytearray(initial) if is_remote(path) else None
    self._handle = None
    self.size = len(initial)  # bytes in the file
    write_bytes(path, initial)
    if not is_remote(path):
      with _reported(path, "open"):
        self._handle = to_path(path).open("ab")

  def append(self, data: bytes) -> None:
    self.size += len(data)
    if self._handle is not None:
      with _reported(self.path, "write"):
        self._handle.write(data)
        self._handle.flush()
      return
    self._content.extend(data)
    write_bytes(self.path, bytes(self._content))

  def close(self) -> None:
    if self._handle is not None:
      self._handle.close()
      self._handle = None


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def _filesystem(path: PathLike) -> tuple[Any, str]:
  """(fsspec filesystem, path inside it) for a URL: what epath uses underneath."""
  import fsspec  # pylint: disable=import-outside-toplevel
  _check_client(os.fspath(path))
  return fsspec.core.url_to_fs(os.fspath(path))


def _check_client(path: str) -> None:
  """A `gs://` path needs gcsfs (epath's GCS backend without TensorFlow) and credentials."""
  if path.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise StorageError(f"{path!r} is on Google Cloud Storage, which needs the gcs extra: "
                         f"pip install -e '.[gcs]'") from None
    problem = _gcs_credentials_problem()
    if problem:
      raise StorageError(f"cannot access {path!r}: {problem}")
    import fsspec  # pylint: disable=import-outside-toplevel
    # Other writers (the other hosts, orbax's tensorstore, a trainer this process polls)
    # change the bucket behind gcsfs's back: no listing cache, every listing is current.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


@functools.lru_cache(maxsize=1)
def _gcs_credentials_problem() -> str | None:
  """Why no GCS credentials can be found, or None (checked once per process).

  Without this check gcsfs falls back to anonymous requests, which fail much
  later with a 401 for every private bucket. An emulator
  (`STORAGE_EMULATOR_HOST`) or an explicit fsspec token needs none.
  """
  import fsspec  # pylint: disable=import-outside-toplevel
  if os.environ.get("STORAGE_EMULATOR_HOST") or fsspec.config.conf.get("gcs", {}).get("token"):
    return None
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth import exceptions  # pylint: disable=import-outside-toplevel
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as error:
    return (f"no Google Cloud credentials found ({_first_line(error)[:120]}); run "
            f"`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS "
            f"to a service-account key file")
  return None


def _bucket_missing(path: PathLike) -> bool:
  """Whether `path` is a URL in a bucket that does not exist (so that is the problem)."""
  text = os.fspath(path)
  if not text.startswith("gs://"):
    return False
  bucket = text[len("gs://"):].split("/", 1)[0]
  try:
    filesystem, _ = _filesystem(text)
    return not filesystem.exists(bucket)
  except Exception:  # pylint: disable=broad-except  # the original error is the one to report
    return False


@contextlib.contextmanager
def _reported(path: PathLike, action: str) -> Iterator[None]:
  """Turns the OS's / the object store's error about `path` into one line."""
  shown = repr(os.fspath(path))
  try:
    yield
  except UserError:
    raise
  except FileNotFoundError:
    if _bucket_missing(path):
      bucket = "gs://" + os.fspath(path)[len("gs://"):].split("/", 1)[0]
      raise StorageError(f"cannot {action} {shown}: the bucket {bucket} does not exist; create "
                         f"it (gcloud storage buckets create {bucket}) or fix the path"
                         ) from None
    raise StorageError(f"cannot {action} {shown}: no such file or directory") from None
  except PermissionError as error:
    raise StorageError(f"cannot {action} {shown}: permission denied "
                       f"({_first_line(error)})") from None
  except (IsADirectoryError, NotADirectoryError) as error:
    raise StorageError(f"cannot {action} {shown}: {_first_line(error)}") from None
  except OSError as error:
    text = _first_line(error)
    if text.startswith("Forbidden"):  # gcsfs: HTTP 403
      raise StorageError(f"cannot {action} {shown}: permission denied (HTTP 403); give the "
                         f"account in use access to the bucket, or check the path") from None
    raise StorageError(f"cannot {action} {shown}: {text}") from None
  except Exception as error:  # pylint: disable=broad-except
    if type(error).__name__ != "HttpError":  # gcsfs: 401 and other HTTP statuses
      raise
    raise StorageError(f"cannot {action} {shown}: {_first_line(error)} (HTTP "
                       f"{getattr(error, 'code', '?')}); check the credentials in use can "
                       f"access the bucket") from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def describe(value: Any) -> str:
  """A path for messages: the string as given."""
  return repr(os.fspath(value))
