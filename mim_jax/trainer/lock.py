"""One training run per workdir: a lock file naming its holder (host, pid, start time).

Two runs on one workdir would interleave `metrics.jsonl` and overwrite each
other's checkpoints, so a run takes `<workdir>/lock` before writing anything
and a second run is refused with one line naming the holder. In a multi-process
run only process 0 takes it (every process opens the same workdir) and tells
the others whether it got it.

What holds where:
  * local disk, NFS with close-to-open semantics: creation is atomic (O_EXCL);
  * GCS: creation is atomic too (a create-only precondition on the object);
  * other object stores: check, then write (two runs starting within the same
    second can both get it).

A lock whose holder is dead is taken over with a warning: on the same host
when its pid no longer runs; from another host when its heartbeat, rewritten
every HEARTBEAT_S by the holder, is older than STALE_AFTER_S (a run killed on
another machine blocks the workdir that long, or until its lock is deleted).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mim_jax import io, workdir as layout
from mim_jax.errors import UserError

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirInUseError(UserError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` the run's exclusive hold on `workdir`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = layout.lock_path(workdir)
    self._record: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock (process 0) or learns that process 0 has it; WorkdirInUseError if not."""
    problem = None
    if jax.process_index() == 0:
      try:
        self._take()
      except WorkdirInUseError as error:
        problem = error
    if jax.process_count() > 1:  # the others learn process 0's outcome and stop with it
      taken = multihost_utils.broadcast_one_to_all(np.int32(problem is None))
      if not int(taken) and problem is None:
        raise WorkdirInUseError(f"process 0 could not lock {self.workdir!r}; see its error")
    if problem is not None:
      raise problem
    if self._record is not None:
      self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                         daemon=True)
      self._heartbeat.start()

  def _take(self) -> None:
    record = _new_record()
    if io.create_new(self.path, _encode(record)):
      self._record = record
      return
    holder = self._read_holder()
    if not holder:  # maybe being written by the run that just created it: look again
      time.sleep(1.0)
      holder = self._read_holder()
    reason = _why_stale(holder)
    if reason is None:
      raise WorkdirInUseError(
          f"the workdir {self.workdir!r} is in use by another run ({_describe(holder)}; lock "
          f"file {self.path}); wait for it to end or use another --workdir (if that run is "
          f"gone, delete the lock file)")
    if self._read_holder() != holder:  # someone else took it over meanwhile
      return self._take()
    io.remove(self.path)
    if not io.create_new(self.path, _encode(record)):
      raise WorkdirInUseError(f"the workdir {self.workdir!r} was locked by another run while "
                              f"this one took over a stale lock ({_describe(self._read_holder())})")
    logging.warning("Took over the lock of %s from a run that is gone (%s; %s)", self.workdir,
                    _describe(holder), reason)
    self._record = record

  def _read_holder(self) -> dict[str, Any]:
    try:
      holder = json.loads(io.read_text(self.path))
      return holder if isinstance(holder, dict) else {}
    except (UserError, ValueError):  # vanished or half-written: judged by the heartbeat rule
      return {}

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if self._read_holder().get("id") != self._record["id"]:
          logging.warning("The lock of %s was taken by another run; this run no longer holds "
                          "it", self.workdir)
          return
        self._record["heartbeat"] = time.time()
        io.write_bytes(self.path, _encode(self._record))
      except UserError as error:  # a storage hiccup: the next beat tries again
        logging.warning("Could not refresh the lock of %s: %s", self.workdir, error)

  def release(self) -> None:
    """Removes the lock if this run still holds it."""
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join(timeout=5)
    if self._record is not None and self._read_holder().get("id") == self._record["id"]:
      io.remove(self.path)
    self._record = None


def _new_record() -> dict[str, Any]:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
          "started_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC"), "heartbeat": now, "id": uuid.uuid4().hex}


def _encode(record: dict[str, Any]) -> bytes:
  return (json.dumps(record) + "\n").encode("utf-8")


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "holder unknown: the lock file is empty or unreadable"
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
          f"{holder.get('started_utc', '?')}")


def _why_stale(holder: dict[str, Any]) -> str | None:
  """Why the holder is known to be gone, or None while it may be alive."""
  if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
    if holder["pid"] == os.getpid() or _process_alive(holder["pid"]):
      return None
    return f"pid {holder['pid']} no longer runs on this host"
  age = time.time() - float(holder.get("heartbeat") or 0.0)
  if age > STALE_AFTER_S:
    return f"its heartbeat is {age / 60:.0f} min old"
  return None


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True
