"""Where a training step's time goes: separately compiled pieces of it, timed.

Used by `python -m mim_jax.bench --breakdown`; free of flags so tests and
notebooks can call it.
"""

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mim_jax import masking
from mim_jax.errors import ConfigError
from mim_jax.tasks.base import TRAIN_STATE_KEYS, normalize_images
from mim_jax.tasks.distill import teacher_forward
from mim_jax.tasks.mae import MaeTask


def median_seconds(run: Callable[[], Any], steps: int) -> float:
  """Median wall time of `run()` over `steps` calls, after one warm-up call."""
  jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def breakdown(task, tx: optax.GradientTransformation, state: dict[str, Any], frozen, batch,
              step_s: float, steps: int) -> dict[str, float]:
  """Where a pre-training step's time goes, from separately compiled pieces of it.

  'forward' (or 'teacher_forward' + 'student_forward') includes the decoder and
  the losses; 'backward' is the student's (the teacher has none), measured as
  loss-and-gradient minus loss; 'optimizer_update' is `tx` alone on the state.
  Each piece is its own XLA program, fused and scheduled on its own: 'unaccounted'
  is what the whole step takes beyond the sum of its pieces (negative when the
  whole is faster).
  """
  if not isinstance(task, MaeTask):
    raise ConfigError(f"--breakdown times pre-training steps; task={task.config.task!r} is not one")
  params, rng = state["params"], jax.random.PRNGKey(0)
  extra = {k: v for k, v in state.items() if k not in TRAIN_STATE_KEYS}
  loss = jax.jit(task.loss_fn)
  loss_and_grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
  forward_s = median_seconds(lambda: loss(params, extra, frozen, batch, rng), steps)
  forward_backward_s = median_seconds(lambda: loss_and_grad(params, extra, frozen, batch, rng),
                                      steps)
  times = {"forward": forward_s}
  if task.distiller is not None:

    def teacher_only(frozen, batch, rng):
      images = normalize_images(batch["image"])
      mask = masking.mask_from_noise(task.masking_noise(rng, images.shape[0]),
                                     task.config.mask_ratio)
      distiller = task.distiller
      return teacher_forward(distiller.teacher, frozen["teacher"], images, mask.ids_keep,
                             distiller.spec)

    teacher = jax.jit(teacher_only)
    teacher_s = median_seconds(lambda: teacher(frozen, batch, rng), steps)
    times = {"teacher_forward": teacher_s, "student_forward": forward_s - teacher_s}
  times["backward"] = forward_backward_s - forward_s

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update)
  grads = jax.tree.map(jnp.zeros_like, params)
  times["optimizer_update"] = median_seconds(
      lambda: update(params, state["opt_state"], grads), steps)
  times["unaccounted"] = step_s - forward_backward_s - times["optimizer_update"]
  result = {}
  for name, seconds in times.items():
    result[f"{name}_ms"] = 1e3 * seconds
    result[f"{name}_percent_of_step"] = 100 * seconds / step_s
  return result
