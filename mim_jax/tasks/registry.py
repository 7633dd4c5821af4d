"""config.task -> the task the trainer runs: one line per method."""

import ml_collections

from mim_jax.errors import ConfigError
from mim_jax.tasks.base import Task
from mim_jax.tasks.finetune import FinetuneTask
from mim_jax.tasks.finetune_distill import FinetuneDistillTask
from mim_jax.tasks.linear_probe import LinearProbeTask
from mim_jax.tasks.mae import MaeTask
from mim_jax.tasks.maskfeat import MaskFeatTask
from mim_jax.tasks.simmim import SimMIMTask

TASKS: dict[str, type[Task]] = {
    "mae": MaeTask,
    "dmae": MaeTask,  # MAE + attention distillation from a frozen teacher
    "d2mae": MaeTask,  # ... decoupled: an attention-only 13th block, decoder on block 8
    "simmim": SimMIMTask,
    "maskfeat": MaskFeatTask,
    "finetune": FinetuneTask,
    "finetune_distill": FinetuneDistillTask,  # + DeiT-style head from a frozen classifier
    "linear_probe": LinearProbeTask,
}


def build_task(config: ml_collections.ConfigDict, **kwargs) -> Task:
  """The task `config.task` names, built from `config` (kwargs go to its constructor)."""
  if config.task not in TASKS:
    raise ConfigError(f"task={config.task!r} is unknown; choose from {sorted(TASKS)}")
  return TASKS[config.task](config, **kwargs)
