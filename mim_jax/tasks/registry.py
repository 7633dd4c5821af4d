"""config.task -> the task object the trainer runs."""

import ml_collections

from mim_jax.errors import ConfigError
from mim_jax.tasks.pretrain import MaePretrainTask

TASKS = {"mae": MaePretrainTask}


def build_task(config: ml_collections.ConfigDict):
  if config.task not in TASKS:
    raise ConfigError(f"task={config.task!r} is unknown; choose from {sorted(TASKS)}")
  return TASKS[config.task](config)
