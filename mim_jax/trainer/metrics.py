"""Progress logs (stdout with throughput and ETA), metrics.jsonl and TensorBoard events."""

import datetime
import json
import os
import time
from typing import Any

from absl import logging


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricWriter:
  """Writes one record per logged step; only the primary process writes files.

  TensorBoard events are written with tensorboardX, which needs no TensorFlow.
  """

  def __init__(self, workdir: str, *, primary: bool = True):
    self.primary = primary
    self._jsonl = None
    self._tb = None
    if primary:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # imported lazily: heavy and optional at import
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.primary:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None


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
