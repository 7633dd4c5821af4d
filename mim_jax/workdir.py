"""What a training run keeps where, and how to read it back: the one place that knows.

  <workdir>/                      local or gs://... (every access through mim_jax.io)
    lock                          the running trainer: host, pid, start time
    metrics.jsonl                 one JSON record per logged step
    tensorboard/                  TensorBoard event files
    reconstructions/step_<step:08d>.png
    checkpoints/<step>/{state, data, meta}
                                  orbax: the train state, the input position per
                                  process, JSON metadata (the config, frozen inputs)
    unreadable_checkpoints/<step> a checkpoint that did not restore, moved aside on
                                  resume (never deleted)

The trainer writes checkpoints with orbax (trainer/checkpoint.py) using the
names defined here; everything that reads a run (a teacher, `config.init`,
the converter, the analyses, the demo) goes through `latest_readable`,
`read_meta`, `read_params` and `read_metrics`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, TypeVar

from absl import logging

from mim_jax import io
from mim_jax.errors import UserError

CHECKPOINTS = "checkpoints"
STATE, DATA, META = "state", "data", "meta"  # the items of one checkpoint
META_FILE = "metadata"  # orbax JsonCheckpointHandler's file inside `meta/`
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RECONSTRUCTIONS = "reconstructions"
LOCK = "lock"
UNREADABLE = "unreadable_checkpoints"

T = TypeVar("T")


class UnreadableCheckpoint(Exception):
  """One checkpoint step cannot be read (damaged, incomplete, not a checkpoint)."""


def checkpoints_dir(workdir: str) -> str:
  return io.join(workdir, CHECKPOINTS)


def metrics_path(workdir: str) -> str:
  return io.join(workdir, METRICS)


def tensorboard_dir(workdir: str) -> str:
  return io.join(workdir, TENSORBOARD)


def figure_path(workdir: str, step: int) -> str:
  return io.join(workdir, RECONSTRUCTIONS, f"step_{step:08d}.png")


def lock_path(workdir: str) -> str:
  return io.join(workdir, LOCK)


def unreadable_dir(workdir: str, step: int) -> str:
  """Where a checkpoint that does not restore is moved (a free name, never overwriting)."""
  target = io.join(workdir, UNREADABLE, str(step))
  suffix = 1
  while io.exists(target):
    suffix += 1
    target = io.join(workdir, UNREADABLE, f"{step}-{suffix}")
  return target


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def finalized_steps(checkpoints: str) -> list[int]:
  """The steps orbax finished writing in `checkpoints`, ascending (maybe unreadable)."""
  from orbax.checkpoint import path as ocp_path  # pylint: disable=import-outside-toplevel
  if not io.is_dir(checkpoints):
    return []
  return sorted(ocp_path.step.checkpoint_steps(io.to_path(checkpoints)))


def is_step_dir(path: str) -> bool:
  return io.is_dir(io.join(path, STATE)) or io.exists(io.join(path, META, META_FILE))


def step_dirs(path: str) -> list[str]:
  """The checkpoint step directories `path` names, newest first.

  `path` is a workdir, its `checkpoints/` directory or one `checkpoints/<step>`.
  """
  path = io.absolute(path)
  if is_step_dir(path):
    return [path]
  checkpoints = checkpoints_dir(path)
  if not io.is_dir(checkpoints):
    checkpoints = path
  return [io.join(checkpoints, str(step)) for step in reversed(finalized_steps(checkpoints))]


def latest_readable(path: str, read: Callable[[str], T]) -> tuple[str, T]:
  """(step directory, `read(step_dir)`) for the newest step of `path` that reads.

  A step whose `read` raises `UnreadableCheckpoint` is skipped with a warning
  naming it; it is left where it is.
  """
  candidates = step_dirs(path)
  if not candidates:
    raise UserError(f"{path!r} holds no mim_jax checkpoint (no {CHECKPOINTS}/<step>/{STATE}); "
                    f"give a workdir of `python -m mim_jax.train` or a converted .npz")
  problems = []
  for step_dir in candidates:
    try:
      result = read(step_dir)
    except UnreadableCheckpoint as error:
      problems.append(f"{step_dir!r}: {error}")
      continue
    for problem in problems:
      logging.warning("Skipped an unreadable checkpoint (left in place): %s", problem)
    return step_dir, result
  raise UserError(f"no checkpoint of {path!r} can be read: {problems[0]}"
                  + (f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""))


# ----------------------------------------------------------------------------
# Reading one step
# ----------------------------------------------------------------------------
def read_meta(step_dir: str) -> dict[str, Any]:
  """The JSON metadata of a checkpoint step (config, frozen inputs, process count)."""
  try:
    meta = json.loads(io.read_text(io.join(step_dir, META, META_FILE)))
    if not isinstance(meta, dict):
      raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
    return meta
  except (UserError, ValueError) as error:
    raise UnreadableCheckpoint(f"its metadata does not read ({_first_line(error)})") from None


def read_config(step_dir: str) -> dict[str, Any]:
  """The config (as a dict) the run was trained with, from one step's metadata."""
  meta = read_meta(step_dir)
  try:
    return json.loads(meta["config"])
  except (KeyError, TypeError, ValueError) as error:
    raise UnreadableCheckpoint(f"its metadata holds no run configuration "
                               f"({_first_line(error)})") from None


def read_params(step_dir: str) -> dict[str, Any]:
  """The trained params of one step as numpy arrays (the rest of the state is not read)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  quiet_late_read_callbacks()
  state_dir = io.to_path(io.join(step_dir, STATE))
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
  except (ValueError, KeyError, OSError) as error:
    raise UnreadableCheckpoint(f"its state metadata does not read "
                               f"({_first_line(error)})") from None
  if "params" not in metadata:
    raise UnreadableCheckpoint(f"its state has no params (entries: {sorted(metadata)})")
  params_meta = {"params": metadata["params"]}
  restore_args = _map_leaves(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(
          state_dir, args=ocp.args.PyTreeRestore(item=params_meta, restore_args=restore_args,
                                                 partial_restore=True))
  except Exception as error:  # pylint: disable=broad-except  # orbax wraps read errors
    raise UnreadableCheckpoint(f"its params do not restore ({_first_line(_root(error))})"
                               ) from None
  return restored["params"]


def quiet_late_read_callbacks() -> None:
  """Silences the one harmless traceback a failed orbax restore leaves behind.

  When one array of a damaged checkpoint fails, orbax closes its event loop while
  tensorstore still completes the other reads; their completion callbacks then
  find the loop closed and Python prints "Exception ignored ... Event loop is
  closed" tracebacks after our one-line warning. Only that exact case is dropped
  (installed once per process); every other unraisable exception is reported.
  """
  if getattr(sys.unraisablehook, "_mim_jax_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook._mim_jax_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def read_run_config(path: str) -> dict[str, Any] | None:
  """The config of the run at `path` (its newest readable step), or None if `path` is
  not a mim_jax run (a file)."""
  if not io.is_dir(path) or not step_dirs(path):
    return None
  return latest_readable(path, read_config)[1]


# ----------------------------------------------------------------------------
# Metrics and figures
# ----------------------------------------------------------------------------
def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl` in order ([] without one); a torn last line is left out."""
  path = metrics_path(workdir)
  if not io.exists(path):
    return []
  records = []
  for line in io.read_text(path).splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:  # a line cut short by a kill: everything before it is whole
      continue
  return records


def last_metrics(workdir: str) -> dict[str, Any]:
  """The last record of the run's metrics.jsonl ({} without one)."""
  records = read_metrics(workdir)
  return records[-1] if records else {}


def latest_figure(workdir: str) -> str | None:
  """The newest reconstruction figure of the run, or None."""
  directory = io.join(workdir, RECONSTRUCTIONS)
  if not io.is_dir(directory):
    return None
  names = [n for n in io.listdir(directory) if n.endswith(".png")]
  return io.join(directory, names[-1]) if names else None


def _map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def _root(error: BaseException) -> BaseException:
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return (lines[0] if lines else type(error).__name__)[:300]
