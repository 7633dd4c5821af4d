"""The training loop, top to bottom: set up, lock the workdir, init or resume, iterate, log,
checkpoint.

The loop knows no model and no method: it runs a `tasks.base.Task` through the
contract declared there (data spec, params, frozen inputs, extra state, the pure
loss, optional evaluation and figure).

What the loop promises: a state with NaN/Inf is never saved (the step reports
whether its updated state is finite); a checkpoint that does not restore is
set aside and the one before it used; SIGTERM and Ctrl-C save, then stop;
one run per workdir; every file goes through mim_jax.io (local or gs://).
"""

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mim_jax import io, workdir as layout
from mim_jax.data import pipeline
from mim_jax.errors import ConfigError, TrainingDivergedError
from mim_jax.trainer import checkpoint, figures, metrics, sharding, signals
from mim_jax.tasks.base import TRAIN_STATE_KEYS, Task
from mim_jax.trainer.lock import WorkdirLock
from mim_jax.trainer.tree import count_params

# Re-exported: scripts, notebooks and tests build steps and figures through `loop`.
from mim_jax.trainer.evaluation import (FIGURE_EXAMPLES, figure_examples,  # noqa: F401
                                        make_evaluator)
from mim_jax.trainer.step import (OPTIMIZERS, jit_train_step, make_optimizer,  # noqa: F401
                                  make_train_step, place_frozen, prepare_state, resolve_steps,
                                  state_is_finite)


def host_copy(tree: Any) -> Any:
  """Numpy copy of a (possibly sharded across hosts) pytree, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict[str, float]:
  """Trains `task` as `config` says, in `workdir`; resumes from its latest checkpoint.

  Returns the last logged metrics. Raises `signals.Interrupted` (a
  KeyboardInterrupt) after saving when stopped by Ctrl-C.
  """
  workdir = io.absolute(workdir)

  # --- Mesh and data -------------------------------------------------------
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  spec = task.data_spec
  loader = pipeline.make_train_loader(
      config.data, spec, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if spec.labels and loader.num_classes and loader.num_classes != config.num_classes:
    raise ConfigError(f"num_classes={config.num_classes} but the data set "
                      f"{config.data.name!r} has {loader.num_classes} classes")
  total_steps, warmup_steps = resolve_steps(config, loader.steps_per_epoch)

  # --- State: abstract shapes -> shardings -> init directly sharded ----------
  abstract_params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = make_optimizer(config, abstract_params, total_steps, warmup_steps,
                                task.weight_decay_mask(abstract_params),
                                task.layer_ids(abstract_params), loader.steps_per_epoch)
  abstract_state, state_shardings, init_state = prepare_state(task, tx, config, mesh)
  frozen, frozen_meta = task.load_frozen()
  frozen, frozen_shardings = place_frozen(frozen, config, mesh)
  evaluator = make_evaluator(task, config, mesh, frozen)

  # --- Nothing is written before the workdir is ours -------------------------
  with WorkdirLock(workdir):
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    try:
      state, data_iter = _init_or_resume(config, task, ckpt, loader, abstract_state,
                                         state_shardings, init_state, frozen_meta)
      logging.info("Model: %s parameters | mesh %s | global batch %d | %d steps (%d warm-up), "
                   "%d train examples", f"{count_params(abstract_params):,}", dict(mesh.shape),
                   config.batch_size, total_steps, warmup_steps, loader.num_records)
      for name, source in frozen_meta.items():
        logging.info("Frozen %s: %s (sha256 %s), %s parameters, not trained or checkpointed",
                     name, source["path"], source["sha256"][:12],
                     f"{count_params(frozen[name]):,}")
      run = _Run(config, workdir, task, ckpt, frozen, frozen_meta, evaluator, total_steps,
                 jit_train_step(task, tx, schedule, state_shardings, frozen_shardings, mesh),
                 mesh)
      return run.iterate(state, data_iter)
    finally:
      ckpt.close()


def _init_or_resume(config, task, ckpt, loader, abstract_state, state_shardings, init_state,
                    frozen_meta) -> tuple[Any, Any]:
  """(state, data iterator): the newest checkpoint that restores, or a fresh init."""

  def restore(step: int) -> tuple[Any, Any]:
    saved_processes = ckpt.read_meta(step).get("process_count", jax.process_count())
    if saved_processes == jax.process_count():
      data_iter = iter(loader)
      state, _ = ckpt.restore(step, abstract_state, data_iter)
    else:  # the batch order does not depend on the process count: continue it here
      state, _ = ckpt.restore(step, abstract_state)
      data_iter = loader.iterator_at(step)
      logging.info("Checkpoint written by %d processes, resumed by %d: the input pipeline "
                   "continues at global batch %d", saved_processes, jax.process_count(), step)
    return state, data_iter

  resumed = ckpt.restore_latest(frozen_meta, restore)
  if resumed is not None:
    step, (state, data_iter) = resumed
    logging.info("Resumed from step %d in %s", step, ckpt.directory)
    return state, data_iter
  state = init_state()
  # Weights from config.init, on the same shardings; the extra state (an EMA, a momentum
  # encoder) starts from the params the run starts with.
  merged = task.merge_pretrained(host_copy(state["params"]))
  state["params"] = jax.device_put(merged, state_shardings["params"])
  extra_shardings = {k: v for k, v in state_shardings.items() if k not in TRAIN_STATE_KEYS}
  state.update(jax.jit(task.init_extra, out_shardings=extra_shardings)(state["params"]))
  return state, iter(loader)


class _Run:
  """The iteration of one `train` call: steps, logs, evaluations, figures, checkpoints."""

  def __init__(self, config, workdir, task, ckpt, frozen, frozen_meta, evaluator, total_steps,
               train_step, mesh):
    self.config, self.workdir, self.task, self.ckpt = config, workdir, task, ckpt
    self.frozen, self.frozen_meta, self.evaluator = frozen, frozen_meta, evaluator
    self.total_steps, self.train_step, self.mesh = total_steps, train_step, mesh
    self.primary = jax.process_index() == 0
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    # Every process computes the figure (params may be sharded across hosts); one writes it.
    self.figure_images = self.reconstruct = None
    if config.get("image_every") and not task.figure_columns:
      raise ConfigError(f"image_every={config.image_every} but task={config.task!r} draws no "
                        f"figure; set --config.image_every=0")
    if config.get("image_every"):
      self.figure_images = figure_examples(config)
      # Replicated output: with several processes every one can fetch it.
      self.reconstruct = jax.jit(task.reconstruct, out_shardings=sharding.replicated(mesh))

  def write_figure(self, state: Any, step: int) -> None:
    if self.reconstruct is None:
      return
    extra = {k: v for k, v in state.items() if k not in TRAIN_STATE_KEYS}
    views = jax.device_get(self.reconstruct(state["params"], extra, self.frozen,
                                            self.figure_images,
                                            jax.random.PRNGKey(self.config.seed)))
    if not self.primary:
      return
    views = {name: views[name] for name in self.task.figure_columns}  # pytrees sort dict keys
    path = layout.figure_path(self.workdir, step)
    figures.save_image_grid(views, path, title=f"step {step}")
    logging.info("Wrote %s", path)

  def drain_metrics(self) -> dict[str, float]:
    """Fetches the metrics of the steps since the last call; stops if a state diverged."""
    if not self.pending:
      return {}
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending.clear()
    for step, values in zip(steps, fetched):
      if not bool(values["finite"]):
        self.stop_diverged(step, float(values["loss"]))
    averaged = {k: float(np.mean([v[k] for v in fetched])) for k in fetched[-1]
                if k not in ("lr", "finite")}
    averaged["lr"] = float(fetched[-1]["lr"])
    return averaged

  def stop_diverged(self, step: int, loss: float) -> None:
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    where = (f"the last good checkpoint is step {good} in {self.ckpt.directory}"
             if good is not None else "no checkpoint was written")
    what = (f"loss became {loss}" if not math.isfinite(loss)
            else f"the update made the parameters or optimizer state non-finite (loss {loss:.4g})")
    raise TrainingDivergedError(
        f"{what} at step {step}; stopped without saving ({where}); lower "
        f"optimizer.base_lr or check the data")

  def iterate(self, state: Any, data_iter: Any) -> dict[str, float]:
    config, total_steps = self.config, self.total_steps
    start_step = int(jax.device_get(state["step"]))
    if start_step >= total_steps:
      logging.info("Nothing to do: step %d of %d already reached in %s", start_step,
                   total_steps, self.workdir)
    writer = metrics.MetricWriter(self.workdir, primary=self.primary, start_step=start_step)
    throughput = metrics.Throughput(start_step, config.batch_size)
    stop = signals.StopSignals(start_step)
    last_scalars: dict[str, float] = {}
    step = start_step
    try:
      while step < total_steps:
        batch = sharding.global_batch(next(data_iter), self.mesh)
        state, step_metrics = self.train_step(state, self.frozen, batch)
        step += 1
        self.pending.append((step, step_metrics))
        if step == start_step + 1:
          logging.info("First step compiled and ran (%.1f s since start of loop)",
                       time.perf_counter() - throughput.last_time)
        final = step == total_steps
        stopping = stop.check(step)
        if step % config.log_every == 0 or final or stopping:
          scalars = self.drain_metrics()
          scalars.update(throughput.update(step))
          metrics.log_line(step, total_steps, scalars)
          writer.write(step, scalars)
          last_scalars = scalars
        if step % config.checkpoint_every == 0 or final or stopping:
          self.drain_metrics()  # raises before a diverged state could be saved
          self.ckpt.save(step, state, data_iter,
                         {"step": step, "config": config.to_json(), "frozen": self.frozen_meta,
                          "process_count": jax.process_count(),
                          "arch": self.task.encoder_arch()})
          throughput.reset_clock(step)  # images/s measures training, not the save
        if self.evaluator is not None and (step % config.eval_every == 0 or final):
          results = self.evaluator(state)
          metrics.log_line(step, total_steps, results)
          writer.write(step, results)
          last_scalars = {**last_scalars, **results}
          throughput.reset_clock(step)
        if config.image_every and (step % config.image_every == 0 or final):
          self.write_figure(state, step)
          throughput.reset_clock(step)
        if stopping:
          self.ckpt.wait()
          message = f"saved step {step} in {self.ckpt.directory}"
          if stop.requested == "SIGINT":
            raise signals.Interrupted(f"interrupted (Ctrl-C): {message}; rerun the same "
                                      f"command to resume")
          logging.warning("SIGTERM received: %s; exiting cleanly", message)
          break
    finally:
      writer.close()
      stop.close()
      _close(data_iter)
    return last_scalars


def _close(data_iter: Any) -> None:
  """Stops the input pipeline's worker processes now, not at interpreter exit (where their
  shutdown races the main thread's and prints tracebacks after the error line)."""
  for candidate in (data_iter, getattr(data_iter, "_iterator", None)):
    close = getattr(candidate, "close", None)
    if callable(close):
      try:
        close()
      except Exception as error:  # pylint: disable=broad-except  # already stopping
        logging.info("Closing the input pipeline: %s", error)
      return
