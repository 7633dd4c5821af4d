"""grain loaders: per-process uint8 batches with checkpointable iterators.

Batches hold 'image' (uint8 NHWC) and, when a loader is made with
`with_labels=True` (classification), 'label' (int32 class indices; a source
without labels is then an error). Pre-training loaders leave labels out.

Training (`make_train_loader`): a `grain.DataLoader` over the source with an
`IndexSampler` (global shuffle with `seed`, reshuffled every epoch, infinite
by default); with several processes a `GlobalBatchSampler` gives each process
its rows of every global batch of that same stream, so the global batches do
not depend on the process count; workers decode, crop, flip, optionally RandAugment /
colour-jitter (data.randaug_* / data.color_jitter, off by default) and batch. Its iterator is a
`grain.DataLoaderIterator`: `get_state()` returns bytes and `set_state(bytes)`
restores the exact position, and it is what grain's orbax handler saves:

    ocp.CheckpointManager(dir, item_handlers={'data': grain.checkpoint.CheckpointHandler(), ...})
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator), ...))
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))

A global batch's content depends on (source, seed, batch size, worker_count),
not on the process count: resuming needs the same values, and grain refuses a
state saved with another worker_count, sampler or source. A run resumed on
another number of processes continues the same batches through
`TrainLoader.iterator_at(step)` (exact unless undecodable images were skipped).

Evaluation (`make_eval_loader`): one deterministic pass over a contiguous
slice of the split per process, centre crops, fixed-size batches with a
'mask' of real examples; every process yields the same number of batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from mim_jax.data import augment, sources, transforms
from mim_jax.data.sources import DataError, config_value, default_data_config, get_source

__all__ = ["EvalLoader", "TrainLoader", "default_data_config", "make_eval_loader",
           "make_train_loader"]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainLoader:
  """Iterable of training batches {'image': uint8 (B, S, S, 3)[, 'label': int32 (B,)]}.

  B = local batch; 'label' is there when the loader was made `with_labels=True`;
  `num_classes` is the source's (None when unknown or unlabelled).

  `iter(loader)` returns a fresh `grain.DataLoaderIterator` at the start;
  call its `set_state` to resume. With workers, the arrays are grain
  `SharedMemoryArray`s (an np.ndarray subclass whose shared memory is freed
  when dropped), and the workers are spawned: a script must start iterating
  under `if __name__ == "__main__":`. Dropping the iterator stops its workers.
  """

  data_loader: grain.DataLoader
  global_batch_size: int
  local_batch_size: int
  num_records: int  # Records in the split, all processes together.
  process_count: int
  num_classes: int | None = None
  with_labels: bool = False
  process_index: int = 0

  def __iter__(self) -> grain.DataLoaderIterator:
    return iter(self.data_loader)

  def iterator_at(self, step: int) -> grain.DataLoaderIterator:
    """An iterator whose next batch is this process's part of global batch `step`.

    For a run resumed on another number of processes (whose saved iterator state
    belongs to the old layout): the batch order is the same for every layout.
    """
    iterator = iter(self.data_loader)
    if step:
      workers = self.data_loader.multiprocessing_options.num_workers
      iterator.set_state(json.dumps(_loader_state_after(
          json.loads(iterator.get_state()), step, self.local_batch_size, workers,
          self.process_index, self.process_count)).encode())
    return iterator

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the split (undecodable images not discounted)."""
    return (self.num_records // self.process_count) // self.local_batch_size


@dataclasses.dataclass(frozen=True)
class EvalLoader:
  """One pass of evaluation batches {'image'[, 'label'], 'mask': bool (B,)}; padding has mask False.

  Every process yields exactly `num_batches` batches of `local_batch_size`;
  'label' is there when the loader was made `with_labels=True` (padding: 0).
  """

  data_loader: grain.DataLoader
  global_batch_size: int
  local_batch_size: int
  image_size: int
  num_records: int  # Records in the split, all processes together.
  num_batches: int
  num_classes: int | None = None
  with_labels: bool = False

  def __iter__(self) -> Iterator[Batch]:
    produced = 0
    for batch in _rebatch(self.data_loader, self.local_batch_size, self.image_size,
                          self.with_labels):
      produced += 1
      if produced > self.num_batches:  # Impossible unless the source changed underneath.
        raise RuntimeError(f"Evaluation produced more than {self.num_batches} batches.")
      yield batch
    for _ in range(self.num_batches - produced):
      yield _padding(self.local_batch_size, self.image_size, self.with_labels)


def make_train_loader(data_config: Any, *, global_batch_size: int, seed: int, image_size: int,
                      process_index: int = 0, process_count: int = 1,
                      worker_count: int | None = None,
                      num_epochs: int | None = None, with_labels: bool = False) -> TrainLoader:
  """The training loader of this process.

  Args:
    data_config: data config (fields in `default_data_config`).
    global_batch_size: batch summed over processes; each process gets
      global_batch_size // process_count.
    seed: shuffle and augmentation seed, in [0, 2**32).
    image_size: side of the square crops.
    process_index, process_count: this JAX process and their number (data shard).
    worker_count: grain worker processes; None = data_config.worker_count; 0 = in-process.
    num_epochs: passes over the data; None = infinite.
    with_labels: batches also hold 'label' (int32); the source must have labels.

  Raises:
    DataError: bad batch size / seed / process index / augmentation setting,
      labels asked of a source without them, or any source error.
  """
  _ensure_absl_flags_parsed()
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if not 0 <= seed < 2**32:
    raise DataError(f"Data seed {seed} out of range: use an integer in [0, 2**32).")
  augmentation = train_augmentation(data_config)
  split = config_value(data_config, "split")
  source = get_source(data_config, split)
  if with_labels:
    _check_has_labels(source, split)
  _check_shard_fits(len(source), split, local_batch_size, process_count)
  shard_options = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  if worker_count is None:
    worker_count = config_value(data_config, "worker_count")
  if process_count == 1:
    sampler = _stream_sampler(len(source), seed, num_epochs)
  else:
    sampler = GlobalBatchSampler(len(source), global_batch_size=global_batch_size,
                                 process_index=process_index, process_count=process_count,
                                 worker_count=worker_count, seed=seed, num_epochs=num_epochs)
  operations = [
      transforms.DecodeRandomResizedCrop(
          image_size, scale=tuple(config_value(data_config, "crop_scale")),
          ratio=tuple(config_value(data_config, "crop_ratio")),
          flip=bool(config_value(data_config, "flip")),
          reduced_decode=bool(config_value(data_config, "reduced_jpeg_decode")),
          decoder=config_value(data_config, "decoder")),  # data.decoder: see data/jpeg.py
      *([augmentation] if augmentation is not None else []),
      transforms.SkipUndecodable(max_consecutive=local_batch_size),
      transforms.KeepFields(_fields(with_labels)),
      grain.transforms.Batch(local_batch_size, drop_remainder=True),
  ]
  loader = _data_loader(data_config, source, sampler, operations, shard_options, worker_count)
  logging.info("Training data: %r, process %d/%d, batch %d of %d, %d workers%s%s.", source,
               process_index, process_count, local_batch_size, global_batch_size,
               loader.multiprocessing_options.num_workers, ", labels" if with_labels else "",
               f", {augmentation}" if augmentation is not None else "")
  return TrainLoader(loader, global_batch_size, local_batch_size, len(source), process_count,
                     num_classes=source.num_classes, with_labels=with_labels,
                     process_index=process_index)


def make_eval_loader(data_config: Any, *, global_batch_size: int, image_size: int,
                     process_index: int = 0, process_count: int = 1,
                     worker_count: int | None = None, split: str | None = None,
                     with_labels: bool = False) -> EvalLoader:
  """The evaluation loader of this process: `split` (default data_config.eval_split), one pass.

  Process p reads the contiguous records [p*N/P, (p+1)*N/P) (remainder spread
  over the first processes) in order; nothing is dropped or repeated. With
  `with_labels`, batches hold 'label' too; for an image folder the split's class
  folders must then be the training split's (else labels would disagree).

  Raises:
    DataError: bad batch size / process index, labels asked of a source without
      them, class folders that differ from the training split's, or any source error.
  """
  _ensure_absl_flags_parsed()
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  split = split or config_value(data_config, "eval_split")
  source = get_source(data_config, split)
  if with_labels:
    _check_has_labels(source, split)
    _check_same_classes(data_config, source, split)
  shard = SliceSource(source, *_contiguous_shard(len(source), process_index, process_count))
  num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch_size)
  operations = [
      transforms.DecodeCenterCrop(image_size, config_value(data_config, "eval_resize_ratio")),
      transforms.SkipUndecodable(max_consecutive=local_batch_size),
      transforms.KeepFields(_fields(with_labels)),
      grain.transforms.Batch(local_batch_size, drop_remainder=False),
  ]
  loader = _data_loader(data_config, shard, _sequential_sampler(len(shard)), operations,
                        grain.sharding.NoSharding(), worker_count)
  logging.info("Eval data: %r, process %d/%d reads records [%d, %d) in %d batches of %d%s.",
               source, process_index, process_count, shard.start, shard.end, num_batches,
               local_batch_size, ", labels" if with_labels else "")
  return EvalLoader(loader, global_batch_size, local_batch_size, image_size, len(source),
                    num_batches, num_classes=source.num_classes, with_labels=with_labels)


# --------------------------------------------------------------------------- #
# Labels
# --------------------------------------------------------------------------- #


def _fields(with_labels: bool) -> tuple[str, ...]:
  return ("image", "label") if with_labels else ("image",)


def _check_has_labels(source: Any, split: str) -> None:
  if not source.has_labels:
    raise DataError(f"Labels were asked for, but split {split!r} of {source!r} has none "
                    "(data.label_key is None): set data.label_key to the label feature, "
                    "or use a labelled data set.")


def _check_same_classes(data_config: Any, source: Any, split: str) -> None:
  """An image folder's evaluation split must have the training split's class folders."""
  if not isinstance(source, sources.ImageFolderSource):
    return  # TFDS: one ClassLabel for all splits.
  train_split = config_value(data_config, "split")
  train_classes = sources.image_folder_classes(config_value(data_config, "data_dir"),
                                               train_split)
  if source.classes != train_classes:
    only_eval = sorted(set(source.classes) - set(train_classes))
    only_train = sorted(set(train_classes) - set(source.classes))
    raise DataError(f"Split {split!r} has {len(source.classes)} class folders and training "
                    f"split {train_split!r} {len(train_classes)} (only in {split!r}: "
                    f"{_listed(only_eval)}; only in {train_split!r}: {_listed(only_train)}), "
                    "so their labels would disagree: give both the same class folders "
                    "(empty ones are fine).")


def _listed(names: Sequence[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") if names else "none"


# --------------------------------------------------------------------------- #
# Fine-tuning augmentation from the data config
# --------------------------------------------------------------------------- #


def train_augmentation(data_config: Any) -> transforms.Augment | None:
  """The RandAugment / colour-jitter step the data config asks for (None: neither).

  Follows timm's `create_transform`: colour jitter is left out while RandAugment
  is on unless data.force_color_jitter (logged when that drops it).

  Raises:
    DataError: a setting out of range or of the wrong type.
  """
  magnitude = config_value(data_config, "randaug_magnitude")
  mstd = _number(data_config, "randaug_mstd", low=0.0)
  num_ops = config_value(data_config, "randaug_num_ops")
  jitter = _number(data_config, "color_jitter", low=0.0)
  force = config_value(data_config, "force_color_jitter")
  if magnitude is not None:
    magnitude = _number(data_config, "randaug_magnitude", low=0.0, high=augment.MAX_MAGNITUDE)
  if isinstance(num_ops, bool) or not isinstance(num_ops, (int, np.integer)) or num_ops < 1:
    raise DataError(f"data.randaug_num_ops {num_ops!r} invalid: use an integer >= 1 "
                    "(ops per image; timm's default 2).")
  if not isinstance(force, (bool, np.bool_)):
    raise DataError(f"data.force_color_jitter {force!r} invalid: use True or False.")
  rand_augment = (augment.RandAugment(magnitude, mstd, int(num_ops))
                  if magnitude is not None else None)
  if jitter and rand_augment is not None and not force:
    logging.info("data.color_jitter=%s is not applied: RandAugment is on, and timm's "
                 "create_transform (MAE's fine-tuning) then disables colour jitter; set "
                 "data.force_color_jitter=True to apply both.", jitter)
    jitter = 0.0
  color_jitter = augment.ColorJitter(jitter, jitter, jitter) if jitter else None
  if rand_augment is None and color_jitter is None:
    return None
  return transforms.Augment(rand_augment, color_jitter)


def _number(data_config: Any, key: str, *, low: float, high: float = math.inf) -> float:
  """data.<key> as a float in [low, high]."""
  value = config_value(data_config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not low <= value <= high):
    allowed = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
    raise DataError(f"data.{key} {value!r} invalid: use a number {allowed}.")
  return float(value)


def _stream_sampler(num_records: int, seed: int,
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
    self._stream = _stream_sampler(num_records, seed, num_epochs)
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


def _loader_state_after(state: dict[str, Any], step: int, local_batch_size: int,
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


def _sequential_sampler(num_records: int) -> Any:
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


def _data_loader(data_config: Any, source: Sequence[Any], sampler: Any,
                 operations: list[Any], shard_options: grain.sharding.ShardOptions,
                 worker_count: int | None) -> grain.DataLoader:
  if worker_count is None:
    worker_count = config_value(data_config, "worker_count")
  if worker_count < 0:
    raise DataError(f"worker_count {worker_count} is negative: use 0 (in-process) or more.")
  read_options = grain.ReadOptions(num_threads=config_value(data_config, "read_threads"),
                                   prefetch_buffer_size=config_value(data_config, "read_buffer_size"))
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations, worker_count=worker_count,
      worker_buffer_size=config_value(data_config, "prefetch_buffer_size"),
      shard_options=shard_options, read_options=read_options)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} / process_count {process_count} invalid: "
                    "need 0 <= process_index < process_count.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f"Global batch size {global_batch_size} is not a positive multiple of the "
                    f"{process_count} processes: change the batch size.")
  return global_batch_size // process_count


def _check_shard_fits(num_records: int, split: str, local_batch_size: int,
                      process_count: int) -> None:
  shard_size = num_records // process_count
  if local_batch_size > shard_size:
    raise DataError(f"Per-process batch {local_batch_size} exceeds the {shard_size} records "
                    f"each of {process_count} processes gets from split {split!r} "
                    f"({num_records} records): lower the batch size.")


def _contiguous_shard(num_records: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of shard `index` of `count`; the first num_records % count shards get one more."""
  per_shard, remainder = divmod(num_records, count)
  start = index * per_shard + min(index, remainder)
  return start, start + per_shard + (index < remainder)


def _rebatch(batches: Iterable[Batch], size: int, image_size: int,
             with_labels: bool) -> Iterator[Batch]:
  """Regroups batches of any sizes into batches of `size` with a mask; pads the last one."""
  fields = _fields(with_labels)
  pending: list[Batch] = []
  count = 0
  for batch in batches:
    pending.append(batch)
    count += len(batch["image"])
    while count >= size:
      merged = {k: np.concatenate([b[k] for b in pending]) for k in fields}
      yield {**{k: v[:size] for k, v in merged.items()}, "mask": np.ones(size, bool)}
      rest = {k: v[size:] for k, v in merged.items()}
      count -= size
      pending = [rest] if count else []
  if count:
    merged = {k: np.concatenate([b[k] for b in pending]) for k in fields}
    pad = _padding(size - count, image_size, with_labels)
    yield {**{k: np.concatenate([merged[k], pad[k]]) for k in fields},
           "mask": np.arange(size) < count}


def _padding(size: int, image_size: int, with_labels: bool) -> Batch:
  """`size` padding examples: black images, label 0, mask False."""
  batch = {"image": np.zeros((size, image_size, image_size, 3), np.uint8)}
  if with_labels:
    batch["label"] = np.zeros((size,), np.int32)
  return {**batch, "mask": np.zeros(size, bool)}


def _ensure_absl_flags_parsed() -> None:
  """grain reads its absl flags; mark them parsed (defaults) when no CLI parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
