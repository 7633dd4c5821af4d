"""Checks of the config keys every task shares, and of the workdir, before anything runs.

Every task reads the same schedule, cadence, size and data keys; a value that
cannot work (`log_every=0`, `keep_checkpoints=0`, `model.depth=0`, a crop scale
above 1) must be a one-line `ConfigError` before a model is built, data is read or
a file is written, not a ZeroDivisionError after compilation or a run that
deletes its checkpoints. `RULES` is one table of (key path, rule, requirement):
a key that moves is re-pointed there. A rule applies only when the config has
the key (a fine-tuning config has no decoder, a pre-training one no
`num_classes`). Method-specific checks (mask ratio, distillation pairs, pooling,
...) stay with their tasks, which run after these.

    check_config(config)     # every rule, then the checks that relate two keys
    check_workdir(workdir)   # a directory, or one that can be created, and writable
    check_output_dir(path, flag, what)   # the same for another command's output flag
"""

import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from mim_jax import io
from mim_jax.errors import ConfigError

Rule = Callable[[Any], bool]


# ----------------------------------------------------------------------------
# Rules: predicates on one value
# ----------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          math.isfinite(value))


def int_at_least(low: int, below: float = math.inf) -> Rule:
  """An integer in [low, below)."""
  return lambda value: _is_int(value) and low <= value < below


def number_in(low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False) -> Rule:
  """A finite number in the interval from `low` to `high` (each end closed unless open)."""

  def rule(value: Any) -> bool:
    if not _is_number(value):
      return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below

  return rule


def optional(rule: Rule) -> Rule:
  """None (unset: derived or off), or a value that passes `rule`."""
  return lambda value: value is None or rule(value)


def ordered_pair(low: float, high: float = math.inf) -> Rule:
  """(a, b) with low < a <= b <= high: a range to sample from."""

  def rule(value: Any) -> bool:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
      return False
    a, b = value
    return _is_number(a) and _is_number(b) and low < a <= b <= high

  return rule


def mesh_axis(value: Any) -> bool:
  return _is_int(value) and (value == -1 or value >= 1)


# ----------------------------------------------------------------------------
# The table: (key path, rule, what the value must be)
# ----------------------------------------------------------------------------
POSITIVE = "must be a positive integer"
RULES: tuple[tuple[str, Rule, str], ...] = (
    ("seed", int_at_least(0, 2**32), "must be an integer in [0, 2**32) (it also seeds the "
     "data order)"),
    ("batch_size", int_at_least(1), f"{POSITIVE} (the global batch, over all devices)"),
    ("total_steps", optional(int_at_least(1)),
     f"{POSITIVE}, or None to derive it from total_epochs"),
    ("total_epochs", number_in(0), "must be a number >= 0"),
    ("warmup_steps", optional(int_at_least(0)),
     "must be an integer >= 0, or None to derive it from warmup_epochs"),
    ("warmup_epochs", number_in(0), "must be a number >= 0"),
    ("image_size", int_at_least(1), f"{POSITIVE} (pixels per side)"),
    ("num_classes", int_at_least(1), POSITIVE),
    ("model.patch_size", int_at_least(1), f"{POSITIVE} (pixels per side of a patch)"),
    ("model.width", optional(int_at_least(1)), f"{POSITIVE}, or None for model.variant's"),
    ("model.depth", optional(int_at_least(1)),
     f"{POSITIVE} (the encoder's blocks), or None for model.variant's"),
    ("model.num_heads", optional(int_at_least(1)), f"{POSITIVE}, or None for model.variant's"),
    ("model.mlp_ratio", number_in(0, low_open=True), "must be a number > 0"),
    ("model.drop_path_rate", number_in(0, 1, high_open=True), "must be in [0, 1)"),
    ("mask_ratio", number_in(0, 1, low_open=True, high_open=True),
     "must be in (0, 1): the fraction of patches the masking hides"),
    ("data.crop_scale", ordered_pair(0.0, 1.0),
     "must be (low, high) with 0 < low <= high <= 1: the crop's fraction of the image area"),
    ("data.crop_ratio", ordered_pair(0.0),
     "must be (low, high) with 0 < low <= high: the crop's aspect-ratio range"),
    ("data.eval_resize_ratio", number_in(0, 1, low_open=True),
     "must be in (0, 1]: the centre crop's fraction of the resized shorter side"),
    ("data.digits_size", int_at_least(1), f"{POSITIVE} (pixels per side)"),
    ("data.randaug_magnitude", optional(number_in(0, 10)),
     "must be in [0, 10], or None for no RandAugment"),
    ("data.randaug_mstd", number_in(0), "must be a number >= 0"),
    ("data.randaug_num_ops", int_at_least(0), "must be an integer >= 0"),
    ("data.color_jitter", number_in(0), "must be a number >= 0 (0 = off)"),
    ("data.worker_count", int_at_least(0), "must be an integer >= 0 (0 = in-process)"),
    ("data.prefetch_buffer_size", int_at_least(1), POSITIVE),
    ("data.read_threads", int_at_least(1), POSITIVE),
    ("data.read_buffer_size", int_at_least(1), POSITIVE),
    ("optimizer.base_lr", number_in(0), "must be a number >= 0"),
    ("optimizer.end_lr", number_in(0), "must be a number >= 0"),
    ("optimizer.warmup_start_lr", number_in(0), "must be a number >= 0"),
    ("optimizer.clip_grad_norm", optional(number_in(0, low_open=True)),
     "must be a number > 0, or None for no clipping"),
    ("optimizer.decay_rate", number_in(0, 1, low_open=True), "must be in (0, 1]"),
    ("optimizer.weight_decay", number_in(0), "must be a number >= 0"),
    ("optimizer.b1", number_in(0, 1, high_open=True), "must be in [0, 1)"),
    ("optimizer.b2", number_in(0, 1, high_open=True), "must be in [0, 1)"),
    ("optimizer.momentum", number_in(0, 1, high_open=True), "must be in [0, 1)"),
    ("optimizer.layer_decay", optional(number_in(0, 1, low_open=True)),
     "must be in (0, 1], or None for no layer-wise decay"),
    ("mesh.data", mesh_axis, "must be a positive integer, or -1 for the remaining devices"),
    ("mesh.fsdp", mesh_axis, "must be a positive integer, or -1 for the remaining devices"),
    ("mesh.fsdp_min_size", int_at_least(0), "must be an integer >= 0"),
    ("log_every", int_at_least(1), f"{POSITIVE}: log every N steps (and at the end)"),
    ("checkpoint_every", int_at_least(1), f"{POSITIVE}: save every N steps (and at the end)"),
    ("keep_checkpoints", int_at_least(1),
     "must be an integer >= 1: how many of the latest checkpoints to keep (0 would delete "
     "every checkpoint of the run)"),
    ("image_every", int_at_least(0), "must be an integer >= 0 (0 = no reconstruction figures)"),
    ("eval_every", int_at_least(0), "must be an integer >= 0 (0 = evaluate only at the end)"),
    ("eval_batch_size", int_at_least(1), POSITIVE),
)


def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
  """(found, value) of dotted `key` in `config`; (False, None) when a part is missing."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first shared key whose value cannot work.

  Cheap and free of JAX: run it before a task is built, data is read or the
  workdir is touched.
  """
  for key, rule, requirement in RULES:
    found, value = lookup(config, key)
    if found and not rule(value):
      raise ConfigError(f"{key}={value!r} {requirement}")
  found, total_steps = lookup(config, "total_steps")
  if found and total_steps is None and not lookup(config, "total_epochs")[1]:
    raise ConfigError("total_steps is None and total_epochs=0: set either to a positive "
                      "value (--config.total_steps or --config.total_epochs)")
  found, patch = lookup(config, "model.patch_size")
  if found and lookup(config, "image_size")[0] and config.image_size % patch:
    raise ConfigError(f"image_size={config.image_size} is not divisible by "
                      f"model.patch_size={patch}")


# ----------------------------------------------------------------------------
# Output directories: the workdir, and other commands' --out / --profile_dir
# ----------------------------------------------------------------------------
def check_workdir(workdir: str | None) -> None:
  """Raises ConfigError unless `workdir` is a directory, or can be created, and is writable."""
  check_output_dir(workdir, "--workdir", "the directory for checkpoints, logs and figures")


def check_output_dir(path: str | None, flag: str, what: str) -> None:
  """Raises ConfigError unless `path` (given as `flag`, `what` it holds) can be written to.

  Reads only: nothing is created. A local path is checked up to its nearest existing
  ancestor (a file there, or no write permission, is an error); a bucket path
  (`gs://...`) only for not being an object, since object stores have no
  directories or permissions to inspect without writing.
  """
  if not path or not path.strip():
    raise ConfigError(f"{flag} is empty: give {what}")
  if io.exists(path) and not io.is_dir(path):
    raise ConfigError(f"{flag}={path} is a file, not a directory; give {what}")
  if io.is_remote(path):
    return
  existing = io.absolute(path)
  while not io.exists(existing) and io.parent(existing) != existing:
    existing = io.parent(existing)
  if not io.is_dir(existing):
    raise ConfigError(f"{flag}={path} cannot be created: {existing} is a file")
  # io has no permission query; a local path only (os.access follows the OS's rules,
  # root included, and knows read-only file systems).
  if not os.access(existing, os.W_OK | os.X_OK):
    where = "it is" if existing == io.absolute(path) else f"{existing} is"
    raise ConfigError(f"{flag}={path} is not writable ({where} read-only); give {what} "
                      f"in a place you can write to")
