"""grain loaders: per-process uint8 batches with checkpointable iterators.

Training (`make_train_loader`) builds the batch a task's `DataSpec` asks for:
each view's uint8 crops under its key, the worker-made fields under their
names, and 'label' (int32 class indices) when the spec asks for labels (a
source without labels is then an error). It is a `grain.DataLoader` over the
source with an `IndexSampler` (global shuffle with `seed`, reshuffled every
epoch, infinite by default); with several processes a `GlobalBatchSampler`
gives each process its rows of every global batch of that same stream, so the
global batches do not depend on the process count. Workers decode each record
once and run `views.DecodeViews` (every view's crop and flip, the fine-tuning
augmentations, the worker fields: one random stream per record, see views.py),
then batch. Its iterator is a `grain.DataLoaderIterator`: `get_state()` returns
bytes and `set_state(bytes)` restores the exact position, and it is what
grain's orbax handler saves:

    ocp.CheckpointManager(dir, item_handlers={'data': grain.checkpoint.CheckpointHandler(), ...})
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))

A global batch's content depends on (source, spec, seed, batch size,
worker_count), not on the process count: resuming needs the same values, and
grain refuses a state saved with another worker_count, sampler or source. A run
resumed on another number of processes continues the same batches through
`TrainLoader.iterator_at(step)` (exact unless undecodable images were skipped).

Evaluation (`make_eval_loader`): one deterministic pass over a contiguous
slice of the split per process, centre crops, fixed-size batches with a
'mask' of real examples; every process yields the same number of batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from mim_jax.data import image_folder, samplers, transforms, views
from mim_jax.data.data_config import DataError, config_value, default_data_config
from mim_jax.data.sources import get_source
from mim_jax.data.spec import DataSpec, ViewSpec
from mim_jax.data.views import train_augmentation

__all__ = ["DataSpec", "EvalLoader", "TrainLoader", "ViewSpec", "default_data_config",
           "make_eval_loader", "make_train_loader", "train_augmentation"]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainLoader:
  """Iterable of training batches: the keys of `spec.batch_keys` (see `make_train_loader`).

  B = local batch; `num_classes` is the source's (None when unknown or unlabelled).

  `iter(loader)` returns a fresh `grain.DataLoaderIterator` at the start;
  call its `set_state` to resume. With workers, the arrays are grain
  `SharedMemoryArray`s (an np.ndarray subclass whose shared memory is freed
  when dropped), and the workers are spawned: a script must start iterating
  under `if __name__ == "__main__":`. Dropping the iterator stops its workers.
  """

  data_loader: grain.DataLoader
  spec: DataSpec
  global_batch_size: int
  local_batch_size: int
  num_records: int  # Records in the split, all processes together.
  process_count: int
  num_classes: int | None = None
  process_index: int = 0

  @property
  def with_labels(self) -> bool:
    return self.spec.labels

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
      iterator.set_state(json.dumps(samplers.loader_state_after(
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


def make_train_loader(data_config: Any, spec: DataSpec, *, global_batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1,
                      worker_count: int | None = None,
                      num_epochs: int | None = None) -> TrainLoader:
  """The training loader of this process: batches of what `spec` asks for.

  A batch holds, with B = global_batch_size // process_count:
    view.key: uint8 (B, view.size, view.size, 3) for each view of `spec`;
    field.name: (B, *field.make(rng).shape) for each worker field;
    'label': int32 (B,) when spec.labels.

  Args:
    data_config: data config (fields in `default_data_config`).
    spec: the task's batch: views, worker fields, labels, augmentation.
    global_batch_size: batch summed over processes.
    seed: shuffle and augmentation seed, in [0, 2**32).
    process_index, process_count: this JAX process and their number (data shard).
    worker_count: grain worker processes; None = data_config.worker_count; 0 = in-process.
    num_epochs: passes over the data; None = infinite.

  Raises:
    DataError: bad batch size / seed / process index / view / augmentation setting,
      labels asked of a source without them, or any source error.
  """
  _ensure_absl_flags_parsed()
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if not 0 <= seed < 2**32:
    raise DataError(f"Data seed {seed} out of range: use an integer in [0, 2**32).")
  transform = views.train_transform(spec, data_config)
  split = config_value(data_config, "split")
  source = get_source(data_config, split)
  if spec.labels:
    _check_has_labels(source, split)
  _check_shard_fits(len(source), split, local_batch_size, process_count)
  shard_options = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  if worker_count is None:
    worker_count = config_value(data_config, "worker_count")
  if worker_count:
    _check_picklable(spec)
  if process_count == 1:
    sampler = samplers.stream_sampler(len(source), seed, num_epochs)
  else:
    sampler = samplers.GlobalBatchSampler(
        len(source), global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, worker_count=worker_count, seed=seed,
        num_epochs=num_epochs)
  operations = [
      transform,
      transforms.SkipUndecodable(max_consecutive=local_batch_size),
      transforms.KeepFields(spec.batch_keys),
      grain.transforms.Batch(local_batch_size, drop_remainder=True),
  ]
  loader = _data_loader(data_config, source, sampler, operations, shard_options, worker_count)
  logging.info("Training data: %r, process %d/%d, batch %d of %d, %d workers, %s.", source,
               process_index, process_count, local_batch_size, global_batch_size,
               loader.multiprocessing_options.num_workers, transform)
  return TrainLoader(loader, spec, global_batch_size, local_batch_size, len(source),
                     process_count, num_classes=source.num_classes, process_index=process_index)


def _check_picklable(spec: DataSpec) -> None:
  """Worker fields travel to the grain workers by pickle: fail here, not in a worker."""
  for field in spec.worker_fields:
    try:
      pickle.dumps(field)
    except Exception as error:  # pylint: disable=broad-exception-caught  # Any pickling error.
      raise TypeError(f"worker field {field.name!r} ({type(field).__name__}) cannot be "
                      f"pickled into the grain workers "
                      f"({type(error).__name__}: {error}): make it a module-level class") from None


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
  start, end = samplers.contiguous_shard(len(source), process_index, process_count)
  shard = samplers.SliceSource(source, start, end)
  num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch_size)
  operations = [
      transforms.DecodeCenterCrop(image_size, config_value(data_config, "eval_resize_ratio")),
      transforms.SkipUndecodable(max_consecutive=local_batch_size),
      transforms.KeepFields(_fields(with_labels)),
      grain.transforms.Batch(local_batch_size, drop_remainder=False),
  ]
  loader = _data_loader(data_config, shard, samplers.sequential_sampler(len(shard)), operations,
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
  if not isinstance(source, image_folder.ImageFolderSource):
    return  # TFDS: one ClassLabel for all splits.
  train_split = config_value(data_config, "split")
  train_classes = image_folder.image_folder_classes(config_value(data_config, "data_dir"),
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
# grain plumbing
# --------------------------------------------------------------------------- #


def _data_loader(data_config: Any, source: Sequence[Any], sampler: Any,
                 operations: list[Any], shard_options: grain.sharding.ShardOptions,
                 worker_count: int | None) -> grain.DataLoader:
  if worker_count is None:
    worker_count = config_value(data_config, "worker_count")
  if worker_count < 0:
    raise DataError(f"worker_count {worker_count} is negative: use 0 (in-process) or more.")
  read_options = grain.ReadOptions(
      num_threads=config_value(data_config, "read_threads"),
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
