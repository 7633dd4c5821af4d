"""Optax AdamW with MAE's schedule and weight-decay exclusions."""

import re
from typing import Any

import jax
import optax

from mim_jax.trainer.tree import path_str

# Weight decay applies to matrices and conv kernels only: biases, LayerNorm scales,
# cls/mask tokens and position embeddings are excluded (method.md §2 recipe).
DECAY_PATTERN = r"(^|/)kernel$"


def weight_decay_mask(params: Any, pattern: str = DECAY_PATTERN) -> Any:
  """A pytree of bools like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(re.search(pattern, path_str(path))),
                                          params)


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
  """lr = base_lr * global_batch / 256 (the MAE/MAE-Lite scaling rule)."""
  return base_lr * global_batch_size / 256


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0) -> optax.Schedule:
  """Per-step linear warm-up from 0 to `peak_lr`, then cosine to `end_lr` at `total_steps`."""
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
          decay_mask: Any) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
