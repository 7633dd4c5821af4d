"""One training step and what it needs: the schedule, the optimizer, the sharded state.

`make_train_step` is pure: state, frozen inputs, batch -> new state, metrics. Its
metrics carry `finite`, whether the loss and every array of the *updated* state
are finite (`state_is_finite`), so the loop never saves a state that diverged.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mim_jax.errors import ConfigError
from mim_jax.trainer import optim, sharding
from mim_jax.trainer.tree import count_blocks


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
                   warmup_steps: int, decay_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW, SGD with momentum, or LARS (MAE's linear probe) on the warm-up + cosine schedule.

  `optimizer.layer_decay` (fine-tuning) scales each leaf's lr by
  decay ** (depth + 1 - layer id); the logged lr is the head's. `decay_mask`
  (default: kernels only) says where weight decay applies.
  """
  opt = config.optimizer
  peak = optim.scaled_learning_rate(opt.base_lr, config.batch_size)
  schedule = optim.warmup_cosine(peak, warmup_steps, total_steps, opt.end_lr)
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
    depth = count_blocks(params)
    tx = optax.chain(tx, optim.scale_per_leaf(optim.layerwise_lr_scales(params, depth,
                                                                        layer_decay)))
  return tx, schedule


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------
def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float | None = None,
                    has_model_state: bool = False) -> Callable:
  """state, frozen, batch -> state, metrics. Pure; the step's rng is fold_in(state rng, step).

  metrics: the loss and its terms, the step's learning rate and `finite`
  (`state_is_finite` of the loss and the updated state).

  Only `state['params']` is differentiated and updated: `frozen` (a teacher) gets
  no gradient and no optimizer state. With `ema_decay`, `state['ema_params']` follows
  the params: ema = decay * ema + (1 - decay) * params after every update. With
  `has_model_state`, `state['model_state']` (BatchNorm running statistics) goes into
  the loss, `loss_fn(params, frozen, batch, rng, model_state) -> (loss, (terms,
  new_model_state))`, and comes out updated, not differentiated.
  """

  def train_step(state: dict[str, Any], frozen: dict[str, Any], batch: dict[str, jax.Array]):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    if has_model_state:
      (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], frozen, batch, step_rng, state["model_state"])
    else:
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], frozen, batch, step_rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    if has_model_state:
      new_state["model_state"] = model_state
    if ema_decay is not None:
      new_state["ema_params"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                             state["ema_params"], params)
    return new_state, {"loss": loss, **terms, "lr": schedule(state["step"]),
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


def prepare_state(task: Any, tx: optax.GradientTransformation,
                  config: ml_collections.ConfigDict, mesh: Mesh):
  """(abstract state with shardings, shardings, init) for {params, opt_state, step, rng}
  (+ ema_params when config.ema_decay is set, + model_state when the task has one).

  `init()` builds the state directly sharded: each device only ever holds its shard.
  """
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_state(rng: jax.Array) -> dict[str, Any]:
    params = task.init_params(rng)
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": train_rng}
    if config.get("ema_decay") is not None:
      state["ema_params"] = params
    if has_model_state(task):
      state["model_state"] = task.init_model_state()
    return state

  abstract = jax.eval_shape(init_state, init_rng)
  shardings = sharding.tree_shardings(abstract, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings, lambda: jax.jit(init_state, out_shardings=shardings)(init_rng)


def has_model_state(task: Any) -> bool:
  """Whether the task keeps non-trained state (BatchNorm statistics) next to its params."""
  return hasattr(task, "init_model_state")


def place_frozen(frozen: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, Any]:
  """Frozen params on the mesh by the same rules as the trained ones: (arrays, shardings)."""
  shardings = sharding.tree_shardings(frozen, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  return jax.device_put(frozen, shardings), shardings


def jit_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   state_shardings: Any, frozen_shardings: Any, mesh: Mesh) -> Callable:
  """The jitted step: state donated, frozen kept, batch split over the mesh, metrics replicated."""
  return jax.jit(make_train_step(task.loss_fn, tx, schedule, task.config.get("ema_decay"),
                                 has_model_state(task)),
                 in_shardings=(state_shardings, frozen_shardings,
                               sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
