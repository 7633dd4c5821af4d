"""Optax AdamW, MAE's schedule and weight-decay exclusions; LARS (linear probing);
layer-wise lr decay (fine-tuning)."""

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from mim_jax.errors import ConfigError
from mim_jax.trainer.tree import path_str

# Weight decay applies to matrices and conv kernels only: biases, LayerNorm scales,
# cls/mask tokens and position embeddings are excluded (docs/methods.md, MAE recipe).
DECAY_PATTERN = r"(^|/)kernel$"


def weight_decay_mask(params: Any, pattern: str = DECAY_PATTERN) -> Any:
  """A pytree of bools like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(re.search(pattern, path_str(path))),
                                          params)


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
  """lr = base_lr * global_batch / 256 (the MAE/MAE-Lite scaling rule)."""
  return base_lr * global_batch_size / 256


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0, start_lr: float = 0.0) -> optax.Schedule:
  """Per-step linear warm-up from `start_lr` to `peak_lr`, then cosine to `end_lr` at
  `total_steps`."""
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=start_lr, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def warmup_multistep(peak_lr: float, warmup_steps: int, milestones: Sequence[int],
                     decay_rate: float, start_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from `start_lr` to `peak_lr`, then peak_lr * decay_rate ** (number of
  milestones <= step): SimMIM's `MultiStepLRScheduler` (timm-style, per step)."""
  milestones = jnp.asarray(sorted(milestones), jnp.int32)

  def schedule(step: jax.Array) -> jax.Array:
    warm = start_lr + (peak_lr - start_lr) * step / max(warmup_steps, 1)
    decays = jnp.sum(milestones <= step)
    return jnp.where(step < warmup_steps, warm, peak_lr * decay_rate**decays)

  return schedule


SCHEDULES = ("warmup_cosine", "warmup_multistep")


def schedule_from_config(opt: Any, batch_size: int, total_steps: int, warmup_steps: int,
                         steps_per_epoch: float) -> optax.Schedule:
  """`optimizer.schedule` of a config: base_lr is per 256 images (`scaled_learning_rate`),
  warmup_start_lr and end_lr are absolute.

  warmup_cosine (MAE): optimizer.warmup_start_lr -> the peak lr, cosine to end_lr.
  warmup_multistep (SimMIM): optimizer.warmup_start_lr -> the peak lr, then x decay_rate
  at each of optimizer.milestone_epochs.
  """
  name = opt.get("schedule", "warmup_cosine")
  peak = scaled_learning_rate(opt.base_lr, batch_size)
  start = opt.get("warmup_start_lr", 0.0)
  if name == "warmup_cosine":
    return warmup_cosine(peak, warmup_steps, total_steps, opt.end_lr, start)
  if name == "warmup_multistep":
    if "milestone_epochs" not in opt or "decay_rate" not in opt:
      raise ConfigError("optimizer.schedule='warmup_multistep' needs optimizer.milestone_epochs "
                        "and optimizer.decay_rate")
    milestones = [int(round(epoch * steps_per_epoch)) for epoch in opt.milestone_epochs]
    return warmup_multistep(peak, warmup_steps, milestones, opt.decay_rate, start)
  raise ConfigError(f"optimizer.schedule={name!r} is unknown; choose from {SCHEDULES}")


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
          decay_mask: Any) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)



def lars(schedule: optax.Schedule, *, momentum: float, weight_decay: float,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """MAE's LARS (linear probing), step for step.

  For leaves with ndim > 1: g += wd * p, then g *= trust * |p| / |g| (1 where a
  norm is 0). Every leaf: mu = momentum * mu + g; p -= lr * mu. The lr multiplies
  the momentum buffer, not the gradient before it (unlike `optax.lars`), which
  matters while the schedule changes the lr.
  """
  def matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)

  return optax.chain(
      optax.add_decayed_weights(weight_decay, matrices),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule))

# ---------------------------------------------------------------------------
# Fine-tuning (docs/methods.md): layer-wise lr decay and MAE's weight-decay rule.

# Leaves that are never decayed although they have ndim >= 2 (MAE / timm
# `no_weight_decay()`: tokens and position embeddings).
NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "mask_token", "dist_token"})


def finetune_weight_decay_mask(params: Any,
                               no_decay_names: frozenset[str] = NO_DECAY_NAMES) -> Any:
  """MAE's fine-tuning rule: decay every leaf with ndim >= 2 except tokens / position embeddings.

  Works on arrays and on `jax.eval_shape` structs. Why both this and
  `weight_decay_mask`: pre-training selects by name (`kernel` leaves), fine-tuning
  by shape as MAE's `param_groups_lrd` (`p.ndim == 1 or n in no_weight_decay_list`).
  On mim_jax's ViT the two agree leaf for leaf (tests check it); the shape rule
  also decays a 2-D leaf that is not called `kernel` (e.g. one a later head adds),
  which is what MAE / timm would do with the same weights, and is what the
  fine-tuning recipe is compared against. `no_decay_names`: the leaf names a
  reference's `no_weight_decay()` lists (SimMIM's ViT lists only pos_embed, cls_token).
  """
  def decays(path: tuple[Any, ...], leaf: Any) -> bool:
    name = path_str(path).rsplit("/", 1)[-1]
    return len(leaf.shape) >= 2 and name not in no_decay_names
  return jax.tree_util.tree_map_with_path(decays, params)


def _check_layer_decay(depth: int, decay: float) -> None:
  if not isinstance(depth, int) or depth < 1:
    raise ConfigError(f"layer-wise lr decay needs depth >= 1, got {depth!r}")
  if not 0.0 < decay <= 1.0:
    raise ConfigError(f"layer_decay must be in (0, 1], got {decay}")


def lr_scales_from_layer_ids(layer_ids: Any, num_layers: int, decay: float) -> Any:
  """decay ** (num_layers + 1 - id) for every leaf of a pytree of int layer ids."""
  _check_layer_decay(num_layers, decay)
  return jax.tree.map(lambda i: float(decay ** (num_layers + 1 - i)), layer_ids)


def layerwise_lr_scales(params: Any, num_layers: int, decay: float,
                        layer_id: Callable[[str, int], int]) -> Any:
  """A pytree of Python floats like `params`: decay ** (num_layers + 1 - layer_id) (head: 1.0).

  `layer_id(path, num_layers)` is the backbone's (`models.registry.Backbone.layer_id`):
  0 for the embedding, i for layer i, num_layers + 1 for the head.
  """
  ids = jax.tree_util.tree_map_with_path(lambda path, _: layer_id(path_str(path), num_layers),
                                         params)
  return lr_scales_from_layer_ids(ids, num_layers, decay)


def scale_per_leaf(scales: Any) -> optax.GradientTransformation:
  """Multiplies each leaf of the updates by the matching leaf of `scales` (stateless)."""
  def init_fn(params: Any) -> optax.EmptyState:
    if jax.tree.structure(params) != jax.tree.structure(scales):
      raise ConfigError("lr scales do not match the params tree: "
                        f"{jax.tree.structure(scales)} vs {jax.tree.structure(params)}")
    return optax.EmptyState()

  def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_layerwise(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
                    decay_mask: Any, lr_scales: Any,
                    eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW where leaf p has lr schedule(step) * lr_scales[p], decay included.

  Equal to PyTorch AdamW with one param group per scale (lr_group = lr * scale,
  decoupled decay p -= lr_group * weight_decay * p where `decay_mask` is True):
  update = -schedule(step) * scale * (m_hat / (sqrt(v_hat) + eps) + wd * mask * p).
  `schedule(step)` is the head's lr (scale 1), which is what the loop logs.
  """
  return optax.chain(
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
      scale_per_leaf(lr_scales))
