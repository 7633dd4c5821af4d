"""Evaluation during training, and the images of the reconstruction figure."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mim_jax.data import pipeline
from mim_jax.data.sources import DataError
from mim_jax.tasks.base import TRAIN_STATE_KEYS, Task
from mim_jax.trainer import sharding

FIGURE_EXAMPLES = 8


def make_evaluator(task: Task, config: ml_collections.ConfigDict, mesh: Mesh,
                   frozen: Any = None) -> Callable[..., dict[str, float]] | None:
  """`evaluate(state)` -> {'val_loss', 'val_top1', ...} over the eval split, or None.

  Tasks that evaluate return sums (`Task.eval_metrics`): names ending in 'loss_sum'
  are averaged over 'count', the others are hit counts reported in percent. A
  missing or empty evaluation split is an error unless `allow_no_eval` says to
  train without it.
  """
  if not task.evaluates or not config.eval_every:
    return None
  try:
    loader = pipeline.make_eval_loader(
        config.data, global_batch_size=config.eval_batch_size, image_size=config.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        with_labels=True)
    if loader.num_records == 0:
      raise DataError(f"the evaluation split {config.data.eval_split!r} is empty")
  except DataError as error:
    if config.allow_no_eval:
      logging.warning("Training without evaluation (allow_no_eval): %s", error)
      return None
    raise DataError(f"{error}; set --config.allow_no_eval=True to train without evaluation, "
                    f"or --config.eval_every=0") from None
  sharding.check_batch_size(config.eval_batch_size, mesh)
  metrics_fn = jax.jit(task.eval_metrics, out_shardings=sharding.replicated(mesh))
  frozen = {} if frozen is None else frozen

  def evaluate(state: dict[str, Any], prefix: str = "val_") -> dict[str, float]:
    extra = {k: v for k, v in state.items() if k not in TRAIN_STATE_KEYS}
    totals = None
    for batch in loader:
      sums = metrics_fn(state["params"], extra, frozen, sharding.global_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(int(totals.pop("count")), 1)
    results = {}
    for name, value in totals.items():
      if name.endswith("loss_sum"):
        results[f"{prefix}{name[:-len('_sum')]}"] = float(value) / count
      else:
        results[f"{prefix}{name}"] = 100.0 * float(value) / count
    return results

  return evaluate


def figure_examples(config: ml_collections.ConfigDict) -> np.ndarray:
  """The same few centre-cropped images at every figure: the eval split's first ones."""
  try:
    loader = pipeline.make_eval_loader(config.data, global_batch_size=FIGURE_EXAMPLES,
                                       image_size=config.image_size, worker_count=0)
  except DataError:  # no evaluation split: the training split, read in order
    loader = pipeline.make_eval_loader(config.data, global_batch_size=FIGURE_EXAMPLES,
                                       image_size=config.image_size, worker_count=0,
                                       split=config.data.split)
  batch = next(iter(loader))
  return batch["image"][batch["mask"]]
