"""One training step and what it needs: the schedule, the optimizer, the sharded state.

`make_train_step` is pure: state, frozen inputs, batch -> new state, metrics, for any
task of the contract in `mim_jax/tasks/base.py`. Its metrics carry `finite`, whether
the loss and every array of the *updated* state are finite (`state_is_finite`), so the
loop never saves a state that diverged.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mim_jax.errors import ConfigError
from mim_jax.tasks.base import TRAIN_STATE_KEYS, Task
from mim_jax.trainer import accumulate, optim, sharding


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
  params and what the loss handed back. Metrics: the loss and its terms, the step's
  learning rate and `finite` (`state_is_finite` of the loss and the updated state).
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
    return new_state, {"loss": loss, **aux.terms, "lr": schedule(state["step"]),
                       "finite": state_is_finite(loss, new_state)}

  return train_step


def state_is_finite(loss: jax.Array, state: Any) -> jax.Array:
  """Whether `loss` and every floating-point array of `state` are free of NaN and Inf.

  Checked on the *updated* state: a finite loss (computed before the update) can
  come with an update that overflowed. One read of the state per step.
  """
  checks = [jnp.all(jnp.isfinite(loss))]
  checks += [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state)
             if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.all(jnp.stack(checks))


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
