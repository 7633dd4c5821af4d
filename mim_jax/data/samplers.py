"""The record orders of the loaders: grain samplers and the shards of each process.

Training reads one stream per (source, seed): a global shuffle, reshuffled
every epoch (`stream_sampler`). With several processes, `GlobalBatchSampler`
gives each process its rows of every global batch of that same stream, so a
global batch does not depend on the process count, and `loader_state_after`
writes the iterator state of any step for any layout (a run resumed on another
number of processes). Evaluation reads a contiguous slice per process, in order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import grain


def stream_sampler(num_records: int, seed: int,
                   num_epochs: int | None) -> grain.samplers.IndexSampler:
  """The record stream a single process reads: a global shuffle, reshuffled every epoch."""
  return grain.samplers.IndexSampler(
      num_records, shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True),
      shuffle=True, num_epochs=num_epochs, seed=seed)


class GlobalBatchSampler:
  """Process p's rows [p*b, (p+1)*b) of every global batch of the single-process stream.

  A single process with W workers builds global batch j in worker j % W from
  stream records i + m*W (i = j % W, m in [(j // W) * B, (j // W + 1) * B)).
  The DataLoader asks this sampler for index k*P + p (its k-th record) and
  gives record k to worker k % W, which batches its records in order; the
  mapping below makes that record the one the single process would have put
  in the same row. Records keep the stream's augmentation rng.
  """

  def __init__(self, num_records: int, *, global_batch_size: int, process_index: int,
               process_count: int, worker_count: int, seed: int, num_epochs: int | None):
    self._stream = stream_sampler(num_records, seed, num_epochs)
    self._args = dict(num_records=num_records, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count,
                      worker_count=worker_count, seed=seed, num_epochs=num_epochs)
    self._batch = global_batch_size
    self._local = global_batch_size // process_count
    self._process, self._count = process_index, process_count
    self._workers = max(worker_count, 1)
    # Whole global batches only, so that every process gets the same number of records.
    self._length = (sys.maxsize if num_epochs is None
                    else len(self._stream) // global_batch_size * global_batch_size)

  def __len__(self) -> int:
    return self._length

  def __repr__(self) -> str:
    return "GlobalBatchSampler(" + ", ".join(f"{k}={v!r}" for k, v in self._args.items()) + ")"

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._length:
      raise IndexError(f"index {index} out of range for {self!r}")
    position, worker = divmod(index // self._count, self._workers)
    row_block, row = divmod(position, self._local)
    stream_index = worker + (row_block * self._batch + self._process * self._local + row
                             ) * self._workers
    # Only a worker's incomplete last batch (dropped) can reach past the finite stream.
    record = self._stream[stream_index % len(self._stream)]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)


def loader_state_after(state: dict[str, Any], step: int, local_batch_size: int,
                       worker_count: int, process_index: int,
                       process_count: int) -> dict[str, Any]:
  """grain's DataLoader iterator state after `step` local batches (fields as grain writes them).

  Worker i made the batches j < step with j % W == i, b records each; grain
  records the last sampler index each worker read and the next worker to ask.
  """
  workers = max(worker_count, 1)
  stride = workers * process_count
  last_seen = {}
  for worker in range(workers):
    consumed = max(0, -(-(step - worker) // workers)) * local_batch_size
    last_seen[str(worker)] = process_index - stride + worker * process_count + consumed * stride
  return {**state, "last_seen_indices": last_seen,
          "last_worker_index": step % workers - 1 if worker_count else -1}


class SliceSource:
  """Records [start, end) of a source."""

  def __init__(self, source: Sequence[Any], start: int, end: int):
    self._source, self.start, self.end = source, start, end

  def __len__(self) -> int:
    return self.end - self.start

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} out of range for {self!r}.")
    return self._source[self.start + index]

  def __repr__(self) -> str:
    return f"SliceSource({self._source!r}, start={self.start}, end={self.end})"


def sequential_sampler(num_records: int) -> Any:
  """Records 0..num_records-1 in order, once (grain's SequentialSampler refuses 0 records)."""
  if num_records == 0:
    return _EmptySampler()
  return grain.samplers.SequentialSampler(num_records, grain.sharding.NoSharding())


class _EmptySampler:
  """A sampler with no records (a process whose eval slice is empty)."""

  def __len__(self) -> int:
    return 0

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    raise IndexError(index)

  def __repr__(self) -> str:
    return "_EmptySampler()"


def contiguous_shard(num_records: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of shard `index` of `count`; the first num_records % count shards get one more."""
  per_shard, remainder = divmod(num_records, count)
  start = index * per_shard + min(index, remainder)
  return start, start + per_shard + (index < remainder)
