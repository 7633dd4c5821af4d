"""The training loop, top to bottom: set up, init or resume, iterate, log, checkpoint.

The loop knows no model and no method: it runs a `tasks.base.Task` through the
contract declared there (data spec, params, frozen inputs, extra state, the pure
loss, optional evaluation and figure).
"""

import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mim_jax.data import pipeline
from mim_jax.data.sources import DataError
from mim_jax.errors import ConfigError, TrainingDivergedError
from mim_jax.trainer import accumulate, checkpoint, figures, metrics, optim, sharding
from mim_jax.tasks.base import TRAIN_STATE_KEYS, Task
from mim_jax.trainer.tree import count_params

FIGURE_EXAMPLES = 8


# ----------------------------------------------------------------------------
# Schedule arithmetic
# ----------------------------------------------------------------------------
def resolve_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from steps or epochs, whichever the config sets."""
  total = config.total_steps or int(round(config.total_epochs * steps_per_epoch))
  if total < 1:
    raise ConfigError("set total_steps or total_epochs to a positive value")
  if config.warmup_steps is not None:
    warmup = config.warmup_steps
  else:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return total, min(warmup, total)


OPTIMIZERS = ("adamw", "sgd", "lars")


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   warmup_steps: int, decay_mask: Any = None, layer_ids: Any = None,
                   steps_per_epoch: float = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW, SGD with momentum, or LARS (MAE's linear probe) on the warm-up + cosine schedule.

  `optimizer.layer_decay` (fine-tuning) scales each leaf's lr by
  decay ** (num_layers + 1 - layer id), with `layer_ids` = (the task's layer id of
  every leaf, num_layers); the logged lr is the head's. `decay_mask` (default:
  kernels only) says where weight decay applies. `optimizer.clip_grad_norm` clips
  the gradients' global norm first (SimMIM: 5).
  """
  opt = config.optimizer
  schedule = optim.schedule_from_config(opt, config.batch_size, total_steps, warmup_steps,
                                        steps_per_epoch)
  decay_mask = optim.weight_decay_mask(params) if decay_mask is None else decay_mask
  name = opt.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ConfigError(f"optimizer.name={name!r} is unknown; choose from {OPTIMIZERS}")
  layer_decay = opt.get("layer_decay")
  if name == "adamw":
    tx = optim.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                     decay_mask=decay_mask)
  elif name == "lars":  # decays and trust-scales the matrices only, as MAE's LARS
    tx = optim.lars(schedule, momentum=opt.momentum, weight_decay=opt.weight_decay,
                    trust_coefficient=opt.get("trust_coefficient", 0.001))
  else:
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=opt.momentum))
  if layer_decay is not None:
    if layer_ids is None:
      raise ConfigError(f"optimizer.layer_decay={layer_decay} but task={config.task!r} has no "
                        f"layers to decay; set it to None")
    ids, num_layers = layer_ids
    tx = optax.chain(tx, optim.scale_per_leaf(optim.lr_scales_from_layer_ids(ids, num_layers,
                                                                            layer_decay)))
  clip = opt.get("clip_grad_norm")
  if clip is not None:
    if not clip > 0:
      raise ConfigError(f"optimizer.clip_grad_norm={clip} must be positive, or None")
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------
def make_train_step(task: Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
  """state, frozen, batch -> state, metrics. Pure; the step's rng is fold_in(state rng, step).

  Only `state['params']` is differentiated and updated by the optimizer: `frozen`
  (a teacher, a probed encoder) gets no gradient and no optimizer state. The
  task's extra state (the other keys of `state`: an EMA, BatchNorm statistics)
  goes into the loss and is then updated by `task.update_extra` from the new
  params and what the loss handed back.
  """

  # config.grad_accum_steps > 1: the mean over micro-batches (trainer/accumulate.py)
  loss_and_grad = accumulate.value_and_grad(task.loss_fn,
                                            accumulate.grad_accum_steps(task.config))

  def train_step(state: dict[str, Any], frozen: dict[str, Any], batch: dict[str, jax.Array]):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    extra = {k: v for k, v in state.items() if k not in TRAIN_STATE_KEYS}
    (loss, aux), grads = loss_and_grad(state["params"], extra, frozen, batch, step_rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_extra = task.update_extra(extra, params, aux.updates, state["step"])
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"], **new_extra}
    return new_state, {"loss": loss, **aux.terms, "lr": schedule(state["step"])}

  return train_step


def prepare_state(task: Task, tx: optax.GradientTransformation,
                  config: ml_collections.ConfigDict, mesh: Mesh):
  """(abstract state with shardings, shardings, init) for {params, opt_state, step, rng}
  plus the task's extra state.

  `init()` builds the state directly sharded: each device only ever holds its shard.
  """
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_state(rng: jax.Array) -> dict[str, Any]:
    params = task.init_params(rng)
    extra = task.init_extra(params)
    clash = TRAIN_STATE_KEYS & set(extra)
    if clash:
      raise ValueError(f"{type(task).__name__}.init_extra uses reserved names {sorted(clash)}")
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": train_rng, **extra}

  abstract = jax.eval_shape(init_state, init_rng)
  shardings = sharding.tree_shardings(abstract, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings, lambda: jax.jit(init_state, out_shardings=shardings)(init_rng)


def place_frozen(frozen: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, Any]:
  """Frozen params on the mesh by the same rules as the trained ones: (arrays, shardings)."""
  shardings = sharding.tree_shardings(frozen, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  return jax.device_put(frozen, shardings), shardings


def jit_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   state_shardings: Any, frozen_shardings: Any, mesh: Mesh) -> Callable:
  """The jitted step: state donated, frozen kept, batch split over the mesh, metrics replicated."""
  return jax.jit(make_train_step(task, tx, schedule),
                 in_shardings=(state_shardings, frozen_shardings,
                               sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


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


# ----------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------
class PreemptionWatcher:
  """Turns SIGTERM (TPU maintenance / preemption) into a flag the loop checks.

  With several processes JAX's preemption service catches SIGTERM, and `check`
  returns True on every process at the same step: one process saving alone
  would wait forever for the others.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1 and _preemption_service_running()
    if self._synced:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it at every step, on every process."""
    if self._synced and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def host_copy(tree: Any) -> Any:
  """Numpy copy of a (possibly sharded across hosts) pytree, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _preemption_service_running() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict[str, float]:
  """Trains `task` as `config` says, in `workdir`; resumes from its latest checkpoint.

  Returns the last logged metrics.
  """
  primary = jax.process_index() == 0

  # --- Mesh and data -------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_size(config.batch_size, mesh)
  spec = task.data_spec
  needs_labels = spec.labels
  loader = pipeline.make_train_loader(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      image_size=spec.views[0].size, process_index=jax.process_index(),
      process_count=jax.process_count(), with_labels=needs_labels)
  if needs_labels and loader.num_classes and loader.num_classes != config.num_classes:
    raise ConfigError(f"num_classes={config.num_classes} but the data set "
                      f"{config.data.name!r} has {loader.num_classes} classes")
  total_steps, warmup_steps = resolve_steps(config, loader.steps_per_epoch)
  data_iter = iter(loader)

  # --- State: abstract shapes -> shardings -> init directly sharded ----------
  abstract_params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = make_optimizer(config, abstract_params, total_steps, warmup_steps,
                                task.weight_decay_mask(abstract_params),
                                task.layer_ids(abstract_params), loader.steps_per_epoch)
  abstract_state, state_shardings, init_state = prepare_state(task, tx, config, mesh)
  frozen, frozen_meta = task.load_frozen()
  frozen, frozen_shardings = place_frozen(frozen, config, mesh)
  evaluator = make_evaluator(task, config, mesh, frozen)

  # --- Init or resume --------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt.check_frozen(latest, frozen_meta)
    saved_processes = ckpt.read_meta(latest).get("process_count", jax.process_count())
    if saved_processes == jax.process_count():
      state, _ = ckpt.restore(latest, abstract_state, data_iter)
    else:  # the batch order does not depend on the process count: continue it here
      state, _ = ckpt.restore(latest, abstract_state)
      data_iter = loader.iterator_at(latest)
      logging.info("Checkpoint written by %d processes, resumed by %d: the input pipeline "
                   "continues at global batch %d", saved_processes, jax.process_count(), latest)
    logging.info("Resumed from step %d in %s", latest, ckpt.directory)
  else:
    state = init_state()
    # Weights from config.init, on the same shardings; the extra state (an EMA, a
    # momentum encoder) starts from the params the run starts with.
    merged = task.merge_pretrained(host_copy(state["params"]))
    state["params"] = jax.device_put(merged, state_shardings["params"])
    extra_shardings = {k: v for k, v in state_shardings.items() if k not in TRAIN_STATE_KEYS}
    state.update(jax.jit(task.init_extra, out_shardings=extra_shardings)(state["params"]))
  start_step = int(jax.device_get(state["step"]))
  logging.info("Model: %s parameters | mesh %s | global batch %d | %d steps (%d warm-up), "
               "%d train examples", f"{count_params(abstract_params):,}", dict(mesh.shape),
               config.batch_size, total_steps, warmup_steps, loader.num_records)

  for name, source in frozen_meta.items():
    logging.info("Frozen %s: %s (sha256 %s), %s parameters, not trained or checkpointed",
                 name, source["path"], source["sha256"][:12], f"{count_params(frozen[name]):,}")
  train_step = jit_train_step(task, tx, schedule, state_shardings, frozen_shardings, mesh)

  if config.get("image_every") and not task.figure_columns:
    raise ConfigError(f"image_every={config.image_every} but task={config.task!r} draws no "
                      f"figure; set --config.image_every=0")
  figure_images = None
  # Every process computes the figure (params may be sharded across hosts); one writes it.
  if config.image_every and task.figure_columns:
    figure_images = figure_examples(config)

  # Replicated output: with several processes every one can fetch it.
  reconstruct = (jax.jit(task.reconstruct, out_shardings=sharding.replicated(mesh))
                 if figure_images is not None else None)

  def write_figure(step: int) -> None:
    if reconstruct is None:
      return
    extra = {k: v for k, v in state.items() if k not in TRAIN_STATE_KEYS}
    views = jax.device_get(reconstruct(state["params"], extra, frozen, figure_images,
                                       jax.random.PRNGKey(config.seed)))
    if not primary:
      return
    views = {name: views[name] for name in task.figure_columns}  # pytrees sort dict keys
    path = os.path.join(workdir, "reconstructions", f"step_{step:08d}.png")
    figures.save_image_grid(views, path, title=f"step {step}")
    logging.info("Wrote %s", path)

  writer = metrics.MetricWriter(workdir, primary=primary)
  throughput = metrics.Throughput(start_step, config.batch_size)
  preemption = PreemptionWatcher()
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_scalars: dict[str, float] = {}

  def drain_metrics() -> dict[str, float]:
    """Fetches the metrics of the steps since the last call; stops on NaN/Inf."""
    if not pending:
      return {}
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    for step, values in zip(steps, fetched):
      if not math.isfinite(float(values["loss"])):
        ckpt.wait()
        good = ckpt.latest_step()
        where = (f"the last good checkpoint is step {good} in {ckpt.directory}"
                 if good is not None else "no checkpoint was written")
        raise TrainingDivergedError(
            f"loss became {float(values['loss'])} at step {step}; stopped without saving "
            f"({where}); lower optimizer.base_lr or check the data")
    averaged = {k: float(np.mean([v[k] for v in fetched])) for k in fetched[-1] if k != "lr"}
    averaged["lr"] = float(fetched[-1]["lr"])
    return averaged

  # --- Train -----------------------------------------------------------------
  if start_step >= total_steps:
    logging.info("Nothing to do: step %d of %d already reached in %s", start_step,
                 total_steps, workdir)
  step = start_step
  try:
    while step < total_steps:
      batch = sharding.global_batch(next(data_iter), mesh)
      state, step_metrics = train_step(state, frozen, batch)
      step += 1
      pending.append((step, step_metrics))
      if step == start_step + 1:
        logging.info("First step compiled and ran (%.1f s since start of loop)",
                     time.perf_counter() - throughput.last_time)

      final = step == total_steps
      preemption.check(step)
      if step % config.log_every == 0 or final or preemption.requested:
        scalars = drain_metrics()
        scalars.update(throughput.update(step))
        metrics.log_line(step, total_steps, scalars)
        writer.write(step, scalars)
        last_scalars = scalars
      if step % config.checkpoint_every == 0 or final or preemption.requested:
        drain_metrics()
        ckpt.save(step, state, data_iter,
                  {"step": step, "config": config.to_json(), "frozen": frozen_meta,
                   "process_count": jax.process_count(), "arch": task.encoder_arch()})
        throughput.reset_clock(step)  # images/s measures training, not the save
      if evaluator is not None and (step % config.eval_every == 0 or final):
        results = evaluator(state)
        metrics.log_line(step, total_steps, results)
        writer.write(step, results)
        last_scalars = {**last_scalars, **results}
        throughput.reset_clock(step)
      if config.image_every and (step % config.image_every == 0 or final):
        write_figure(step)
        throughput.reset_clock(step)
      if preemption.requested:
        ckpt.wait()
        logging.warning("SIGTERM received: saved step %d in %s; exiting cleanly", step,
                        ckpt.directory)
        break
  finally:
    ckpt.close()
    writer.close()
    preemption.close()
  return last_scalars
