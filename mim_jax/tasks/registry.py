"""config.task -> the task object the trainer runs."""

import ml_collections

from mim_jax.errors import ConfigError
from mim_jax.tasks.distill import DistillationTask
from mim_jax.tasks.finetune import FinetuneTask
from mim_jax.tasks.linear_probe import LinearProbeTask
from mim_jax.tasks.pretrain import MaePretrainTask

TASKS = {"mae": MaePretrainTask, "dmae": DistillationTask, "d2mae": DistillationTask,
         "finetune": FinetuneTask, "linear_probe": LinearProbeTask}


def build_task(config: ml_collections.ConfigDict):
  if config.task not in TASKS:
    raise ConfigError(f"task={config.task!r} is unknown; choose from {sorted(TASKS)}")
  return TASKS[config.task](config)
