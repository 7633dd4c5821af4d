"""The contract between the trainer and a task (a pre-training method, fine-tuning, probing).

The trainer knows this class and nothing about any method. A task says:

* what batch it trains on: `data_spec` (views, worker-made fields, labels);
* its trained params: `init_params(rng)`, optionally filled from pre-trained
  weights by `merge_pretrained`, the weight-decay mask and layer ids for
  layer-wise lr decay;
* its *frozen inputs*: `load_frozen()` -> (arrays, what identifies them), e.g. a
  distillation teacher or the probed encoder; they enter the one jitted step as an
  argument, are never differentiated, never get optimizer state and are not
  checkpointed (their path and content hash are, and resuming with other ones is
  refused);
* its *extra state*: arrays updated inside the jitted step after the optimizer
  update, not by gradients: an EMA of the weights, BatchNorm running statistics,
  a momentum encoder, DINO's centre. `init_extra(params)` makes them;
  `update_extra(extra, params, updates, step)` returns them updated, where
  `params` are the freshly updated params and `updates` is what the loss handed
  back (`LossAux.updates`). They are checkpointed with the params;
* the pure loss of one batch: `loss_fn(params, extra, frozen, batch, rng) ->
  (loss, LossAux(terms, updates))`; `terms` are the scalars the trainer logs;
* optionally an evaluation (`evaluates = True`, `eval_metrics`) and a figure
  (`figure_columns` non-empty, `reconstruct`);
* its analytic training FLOPs per image (model-FLOPs utilisation in `bench`), and
  the architecture of the encoder it trains (`encoder_arch`, saved with checkpoints).

Params and extra state are pytrees of arrays; a task's extra-state names are keys
of the train state next to 'params', 'opt_state', 'step' and 'rng'.
"""

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.data.spec import DataSpec

Params = Any
Frozen = dict[str, Any]
Batch = dict[str, jax.Array]
TRAIN_STATE_KEYS = frozenset({"params", "opt_state", "step", "rng"})


class LossAux(NamedTuple):
  """What a loss returns besides the scalar it minimises.

  terms: named float32 scalars, logged (the total is logged as 'loss').
  updates: whatever `update_extra` needs from the forward pass (BatchNorm batch
    statistics, a teacher's outputs for DINO's centre); None when nothing.
  """
  terms: dict[str, jax.Array]
  updates: Any = None


class Task(abc.ABC):
  """Base class of every job the trainer runs (see the module docstring)."""

  #: column names of the figure `reconstruct` returns; empty = the task draws none
  figure_columns: tuple[str, ...] = ()
  #: whether `eval_metrics` is implemented (a labelled evaluation split is read)
  evaluates: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- What the loader makes ---------------------------------------------------
  @property
  @abc.abstractmethod
  def data_spec(self) -> DataSpec:
    """The training batch this task needs."""

  # --- Trained params ----------------------------------------------------------
  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Params:
    """Fresh params (the trainer initialises them directly sharded)."""

  def merge_pretrained(self, params: Params) -> Params:
    """`params` (host arrays) with pre-trained weights put in; the default keeps them."""
    return params

  def weight_decay_mask(self, params: Params) -> Any:
    """Where weight decay applies (a pytree of bools like `params`); None = matrices
    named `kernel` (the trainer's default)."""
    del params
    return None

  def layer_ids(self, params: Params) -> tuple[Any, int] | None:
    """(pytree of int layer ids like `params`, number of layers) for layer-wise lr decay
    (`optimizer.layer_decay`); None when the task has no layers to decay."""
    del params
    return None

  # --- Frozen inputs and extra state -------------------------------------------
  def load_frozen(self) -> tuple[Frozen, dict[str, Any]]:
    """({name: params}, {name: {'path', 'sha256'}}): the step's frozen inputs."""
    return {}, {}

  def init_extra(self, params: Params) -> dict[str, Any]:
    """The extra state (see the module docstring), made from the fresh params."""
    del params
    return {}

  def update_extra(self, extra: dict[str, Any], params: Params, updates: Any,
                   step: jax.Array) -> dict[str, Any]:
    """The extra state after a step; runs inside the jitted step, after the update."""
    del params, updates, step
    return extra

  # --- The step ------------------------------------------------------------------
  @abc.abstractmethod
  def loss_fn(self, params: Params, extra: dict[str, Any], frozen: Frozen, batch: Batch,
              rng: jax.Array) -> tuple[jax.Array, LossAux]:
    """Pure: the scalar loss of one batch (float32) and its `LossAux`."""

  @abc.abstractmethod
  def train_flops_per_image(self) -> float:
    """Analytic matmul FLOPs of one training example, forward and backward."""

  def encoder_arch(self) -> dict[str, Any] | None:
    """The architecture of `params['encoder']` (or of the params, for a classifier), saved
    in checkpoint metadata so readers (teachers, fine-tuning inits, export, analysis)
    rebuild exactly this encoder; None when the task trains no encoder."""
    return None

  # --- Optional: evaluation and figures --------------------------------------
  def eval_metrics(self, params: Params, extra: dict[str, Any], frozen: Frozen,
                   batch: Batch) -> dict[str, jax.Array]:
    """Sums over the real examples of an evaluation batch (batch['mask']): 'count',
    names ending in 'loss_sum' (averaged by the trainer) and hit counts (reported in
    percent). Only when `evaluates`."""
    raise NotImplementedError(f"{type(self).__name__} does not evaluate")

  def reconstruct(self, params: Params, extra: dict[str, Any], frozen: Frozen,
                  images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """{column: (B, H, W, 3) floats in [0, 1]} for `figure_columns`, from uint8 images."""
    raise NotImplementedError(f"{type(self).__name__} draws no figure")


def ema_update(average: Params, params: Params, decay: float | jax.Array) -> Params:
  """average <- decay * average + (1 - decay) * params, leaf by leaf (timm's ModelEmaV2)."""
  return jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, params)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 normalised with the ImageNet mean and std."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def denormalize_images(images: jax.Array) -> jax.Array:
  """Inverse of `normalize_images`, clipped to [0, 1]."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return jnp.clip(images * std + mean, 0.0, 1.0)
