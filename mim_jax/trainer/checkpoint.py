"""Orbax checkpoints of the train state, the data iterator position and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`. Orbax writes each step
to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest; stale temporaries are
removed on the next start.
"""

import os
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mim_jax.errors import CheckpointMismatchError
from mim_jax.trainer.tree import flatten_with_names


class Checkpointer:
  """Saves and restores {state, data iterator, meta} with an orbax CheckpointManager."""

  def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
    # orbax needs absolute paths; gs:// and other URLs already are.
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with `step` (read without touching the state)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def check_frozen(self, step: int, frozen_meta: dict[str, Any]) -> None:
    """Refuses to resume with frozen inputs (a teacher) other than those trained with."""
    saved = self.read_meta(step).get("frozen", {})
    for name in sorted(set(saved) | set(frozen_meta)):
      before, now = saved.get(name), frozen_meta.get(name)
      if (before or {}).get("sha256") != (now or {}).get("sha256"):
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} was trained with {name} "
            f"{_describe(before)}, but this run has {name} {_describe(now)}; resume with the "
            f"original {name} or use another --workdir (the checkpoint was left untouched)")

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError naming every leaf whose shape differs."""
    stored = self.manager.item_metadata(step)["state"]
    stored_shapes = {k: tuple(v.shape) for k, v in flatten_with_names(stored).items()
                     if hasattr(v, "shape")}
    wanted = {k: tuple(np.shape(v)) for k, v in flatten_with_names(abstract_state).items()}
    problems = []
    for name in sorted(set(stored_shapes) | set(wanted)):
      if name not in wanted:
        problems.append(f"{name}: in checkpoint only {stored_shapes[name]}")
      elif name not in stored_shapes:
        problems.append(f"{name}: missing from checkpoint (model wants {wanted[name]})")
      elif stored_shapes[name] != wanted[name]:
        problems.append(f"{name}: checkpoint {stored_shapes[name]} vs model {wanted[name]}")
    if problems:
      shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8
                                         else "")
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} belongs to a different model "
          f"({len(problems)} leaves differ: {shown}); use another --workdir or the matching "
          f"config (the checkpoint was left untouched)")

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any = None) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    These are the current run's, so any mesh and process count works. Without
    `data_iterator` the saved input position is left alone (it is saved per
    process, so a run with another process count cannot use it).
    """
    self.check_compatible(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _describe(source: dict[str, Any] | None) -> str:
  if not source:
    return "(none)"
  return f"{source.get('path')!r} (sha256 {str(source.get('sha256'))[:12]}...)"
