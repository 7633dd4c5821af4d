"""Gradient accumulation: one optimizer step on a global batch, computed over micro-batches.

With `config.grad_accum_steps = m` the jitted train step splits its batch of B
examples into m micro-batches of B / m, runs the loss and its gradient on each in
a `lax.scan` (so only one micro-batch's activations are alive at a time) and
hands the mean of the m gradients to the optimizer once. The paper's batch of
4096 then fits one GPU, a Colab runtime or a small slice: the learning rate, the
schedule and the checkpoints are those of the batch of 4096.

What each piece of the step sees:

* **Micro-batches** are strided: micro-batch i holds examples i, i + m, i + 2m, ...
  A device that holds a contiguous block of the global batch therefore holds an
  equal share of every micro-batch, and splitting moves no data between devices
  (this needs B divisible by m x the number of devices, checked in
  `grad_accum_steps`).
* **Randomness** is the full batch's, sliced. Each micro-batch's loss gets a key
  of its own (`micro_batch_key`) whose draws with a leading dimension of B / m
  are the rows of micro-batch i of the same draw of B rows from the step's key;
  draws of any other shape (a mixup lambda, a cutmix box) are the full batch's
  draw itself, the same in every micro-batch. So MAE's masking noise and the
  per-example stochastic depth of fine-tuning are exactly those of the
  unaccumulated step (each micro-batch computes the B-row draw and keeps its rows:
  cheap, the noise is B x patches numbers).
* **Losses that are means over examples** (MAE and D²-MAE: the masked-patch mean
  with the same number of masked patches in every image, the distillation MSE;
  cross entropy) give the full batch's loss and gradient as the mean of the
  micro-batch ones, to float rounding: 4 x 16 accumulated equals one step of 64
  (tests/test_grad_accum.py). A loss normalised by a count that varies per
  example (MaskFeat's block-wise masks) is the mean of per-micro-batch
  normalisations instead: close, not equal.
* **Whatever compares examples with each other sees its micro-batch only**:
  BatchNorm statistics (the linear probe normalises each micro-batch with its own
  mean and variance, as MAE's `main_linprobe.py --accum_iter` does), mixup's
  partners (each micro-batch mixes with itself reversed), contrastive negatives.
* **Extra state** (`Task.update_extra`) is updated once per optimizer step, after
  the update, from the mean over micro-batches of what the losses handed back
  (`LossAux.updates`, which must be floating point): the linear probe's running
  BatchNorm statistics move once, by the micro-batches' mean statistics; an EMA of
  the weights moves once, as without accumulation.
* **Logged terms** are the means over micro-batches.
* **Communication**: the partitioner reduces each micro-batch's gradient across
  devices inside the loop, so with data parallelism the gradient all-reduce can run
  once per micro-batch, m times a step (as PyTorch DDP without `no_sync`; with FSDP
  the gradient reduction likewise, as FSDP does by default). XLA's CPU compiler keeps
  it so (`bench --scaling --scaling_grad_accum=m` shows the bytes); XLA has a pass
  that hoists an all-reduce whose result is only accumulated out of a loop
  (`WhileLoopAllReduceCodeMotion`), which accelerator compilers may apply. On one
  device there is none.

Gradients and terms are summed in float32 (or wider) whatever their dtype.
"""

import functools
import math
from typing import Any, Callable

import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
import ml_collections

from mim_jax.errors import ConfigError

LossFn = Callable[..., tuple[jax.Array, Any]]


def grad_accum_steps(config: ml_collections.ConfigDict) -> int:
  """`config.grad_accum_steps`, checked: the one place it is read (1 when a config lacks it)."""
  steps = config.get("grad_accum_steps", 1)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ConfigError(f"grad_accum_steps={steps!r} must be a positive integer (1 = no "
                      f"accumulation)")
  if steps == 1:
    return steps
  devices = jax.device_count()
  if config.batch_size % (steps * devices):
    raise ConfigError(
        f"batch_size {config.batch_size} is not divisible by grad_accum_steps={steps} x "
        f"{devices} devices (every micro-batch is split over all devices); use a batch_size "
        f"that is a multiple of {steps * devices} or another grad_accum_steps")
  return steps


def split_batch(batch: Any, steps: int) -> Any:
  """(B, ...) leaves -> (B / steps, steps, ...), a reshape that copies nothing: row j of the
  batch is example j // steps of micro-batch j % steps (`micro_batch`)."""
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every batch field needs the same leading (batch) dimension to be "
                     f"split into micro-batches; got leading sizes {sorted(map(str, sizes))}")
  size = sizes.pop()
  if size % steps:
    raise ConfigError(f"a batch of {size} examples cannot be split into grad_accum_steps="
                      f"{steps} equal micro-batches; use a batch_size divisible by {steps}")
  return jax.tree.map(lambda x: x.reshape((size // steps, steps) + x.shape[1:]), batch)


def micro_batch(split: Any, index: jax.Array) -> Any:
  """Micro-batch `index` of a `split_batch`: examples index, index + steps, ... ."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False),
                      split)


@functools.lru_cache(maxsize=None)
def _sliced_impl(base: Any, base_shape: tuple[int, ...], steps: int, micro_size: int) -> Any:
  """A PRNG implementation whose keys are (key of `base`, micro-batch index).

  Splitting and folding act on the `base` part, so every key derived from a
  micro-batch key stays the matching derivation of the step's key. Bits of a
  shape with leading dimension `micro_size` are that micro-batch's rows
  (`split_batch`'s striding) of the same draw with `steps * micro_size` rows.
  """
  width = math.prod(base_shape)

  def base_key(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data[:width].reshape(base_shape), impl=base)

  def with_index(base_data: jax.Array, index: jax.Array) -> jax.Array:
    flat = base_data.reshape(base_data.shape[:base_data.ndim - len(base_shape)] + (width,))
    index = jnp.broadcast_to(index, flat.shape[:-1] + (1,))
    return jnp.concatenate([flat, index.astype(flat.dtype)], axis=-1)

  def seed(value: jax.Array) -> jax.Array:
    return with_index(jax.random.key_data(jax.random.key(value, impl=base)), jnp.uint32(0))

  def split(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    children = jax.random.key_data(jax.random.split(base_key(data), shape))
    return with_index(children, data[width:])

  def fold_in(data: jax.Array, value: jax.Array) -> jax.Array:
    folded = jax.random.key_data(jax.random.fold_in(base_key(data), value))
    return with_index(folded, data[width:])

  def random_bits(data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    dtype = jnp.dtype(f"uint{bit_width}")
    if not shape or shape[0] != micro_size:
      return jax.random.bits(base_key(data), shape, dtype)
    rest = tuple(shape[1:])
    full = jax.random.bits(base_key(data), (micro_size * steps,) + rest, dtype)
    return full.reshape((micro_size, steps) + rest)[:, data[width]]

  return jax_random.define_prng_impl(
      key_shape=(width + 1,), seed=seed, split=split, random_bits=random_bits,
      fold_in=fold_in, name=f"micro_batch_of_{base}_{steps}x{micro_size}",
      tag=f"mb{steps}x{micro_size}")


def micro_batch_key(rng: jax.Array, index: jax.Array, steps: int,
                    micro_size: int) -> jax.Array:
  """The key micro-batch `index` of `steps` (of `micro_size` examples) hands to the loss.

  `rng` is the step's key (a raw uint32 key of the default implementation or a
  typed key). Per-example draws from the returned key (leading dimension
  `micro_size`) are this micro-batch's rows of the step's draw; others are the
  step's draw.
  """
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  data = jax.random.key_data(rng)
  impl = _sliced_impl(jax.random.key_impl(rng), data.shape, steps, micro_size)
  data = data.reshape(-1)
  index = jnp.asarray(index, data.dtype).reshape(1)
  return jax.random.wrap_key_data(jnp.concatenate([data, index]), impl=impl)


def _accumulator(tree: Any) -> Any:
  """Zeros like the (abstract) `tree`, in float32 or wider; refuses non-float leaves."""
  def zeros(leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"gradient accumulation averages what the loss returns; a {leaf.dtype} "
                      f"leaf cannot be averaged (LossAux terms and updates must be floats)")
    return jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32))
  return jax.tree.map(zeros, tree)


def value_and_grad(loss_fn: LossFn, steps: int) -> Callable:
  """`jax.value_and_grad(loss_fn, has_aux=True)` over `steps` micro-batches.

  `loss_fn(params, extra, frozen, batch, rng) -> (loss, aux)` is a task's loss
  (`Task.loss_fn`); the returned function has the same signature and returns
  ((loss, aux), grads), each the mean over the micro-batches (see the module
  docstring for what that equals). With steps == 1 it is exactly
  `jax.value_and_grad`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn

  def accumulated(params, extra, frozen, batch, rng):
    split = split_batch(batch, steps)
    micro_size = jax.tree.leaves(split)[0].shape[0]

    def one(index):
      key = micro_batch_key(rng, index, steps, micro_size)
      return grad_fn(params, extra, frozen, micro_batch(split, index), key)

    def body(total, index):
      return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, one(index)), None

    like = jax.eval_shape(one, jnp.uint32(0))
    total, _ = jax.lax.scan(body, _accumulator(like), jnp.arange(steps, dtype=jnp.uint32))
    return jax.tree.map(lambda t, x: (t / steps).astype(x.dtype), total, like)

  return accumulated
