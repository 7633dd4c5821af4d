"""Progress logs (stdout with throughput and ETA), metrics.jsonl and TensorBoard events.

Both files go through mim_jax.io, so a gs:// workdir gets them too. A resumed
run first cuts `metrics.jsonl` back to the step it resumes from, so the steps it
repeats are never logged twice; its new TensorBoard event file starts with a
session-start record at the next step, which makes TensorBoard drop the
earlier run's records from there on.
"""

import datetime
import json
import socket
import struct
import time
from typing import Any

from absl import logging

from mim_jax import io, workdir as layout

# Object stores rewrite an event file at every flush: start a new one past this size.
MAX_REWRITTEN_EVENT_FILE_BYTES = 4 << 20


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricWriter:
  """Writes one record per logged step; only the primary process writes files.

  `start_step`: the step the run starts or resumes from; records of later
  steps already in `metrics.jsonl` (logged before an interruption) are dropped.
  """

  def __init__(self, workdir: str, *, primary: bool = True, start_step: int = 0):
    self.primary = primary
    self._jsonl = None
    self._events = None
    if primary:
      self._jsonl = io.AppendableFile(layout.metrics_path(workdir),
                                      _records_up_to(workdir, start_step))
      self._events = EventFile(layout.tensorboard_dir(workdir), start_step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.primary:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.append((json.dumps(record) + "\n").encode("utf-8"))
    self._events.write_scalars(int(step), record)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._events.close()
      self._jsonl = self._events = None


def _records_up_to(workdir: str, step: int) -> bytes:
  """metrics.jsonl's lines for steps <= `step` (a run resumed at `step` repeats the rest)."""
  records = layout.read_metrics(workdir)
  kept = [r for r in records if int(r.get("step", 0)) <= step]
  if len(kept) < len(records):
    logging.info("metrics.jsonl: dropped %d record(s) after step %d, which this run repeats",
                 len(records) - len(kept), step)
  return "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")


class EventFile:
  """TensorBoard scalars in the TFRecord event format, written through mim_jax.io.

  The records are built with tensorboardX's protobufs (no TensorFlow needed).
  """

  def __init__(self, directory: str, start_step: int = 0):
    self.directory = directory
    self.start_step = start_step
    self._file = None
    self._start_file(session_start=True)

  def _start_file(self, session_start: bool) -> None:
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    if self._file is not None:
      self._file.close()
    now = time.time()
    path = io.join(self.directory, f"events.out.tfevents.{now:.6f}.{socket.gethostname()}")
    records = [_record(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))]
    if session_start:  # TensorBoard drops earlier records from here on: a resumed run's repeats
      records.append(_record(event_pb2.Event(
          wall_time=now, step=self.start_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))))
    self._file = io.AppendableFile(path, b"".join(records))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    if io.is_remote(self.directory) and self._file.size > MAX_REWRITTEN_EVENT_FILE_BYTES:
      self._start_file(session_start=False)
    values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
              for name, value in scalars.items() if name != "step"]
    event = event_pb2.Event(wall_time=time.time(), step=step,
                            summary=summary_pb2.Summary(value=values))
    self._file.append(_record(event))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def _record(event: Any) -> bytes:
  """One TFRecord: length, its masked CRC32C, the payload, the payload's masked CRC32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class Throughput:
  """Images/s over the last logging interval and the ETA from it."""

  def __init__(self, start_step: int, global_batch_size: int):
    self.batch = global_batch_size
    self.last_step = start_step
    self.last_time = time.perf_counter()

  def reset_clock(self, step: int) -> None:
    """Restarts the measurement at `step` (after a save or figure, so those are not counted)."""
    self.last_step, self.last_time = step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, elapsed = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {"images_per_sec": steps * self.batch / elapsed, "sec_per_step": elapsed / max(steps, 1)}


def log_line(step: int, total_steps: int, scalars: dict[str, Any]) -> None:
  """step 100/1000 (10.0%) | loss 0.9876 | lr 1.20e-04 | 123.4 img/s | ETA 0:12:34"""
  parts = [f"step {step}/{total_steps} ({100.0 * step / total_steps:.1f}%)"]
  for name, value in scalars.items():
    if name in ("images_per_sec", "sec_per_step"):
      continue
    parts.append(f"{name} {value:.3e}" if name == "lr" else f"{name} {value:.4f}")
  if "images_per_sec" in scalars:
    parts.append(f"{scalars['images_per_sec']:.1f} img/s")
    eta = (total_steps - step) * scalars.get("sec_per_step", 0.0)
    parts.append(f"ETA {format_duration(eta)}")
  logging.info(" | ".join(parts))
