"""Orbax checkpoints of the train state, the data iterator position and run metadata.

Layout (see mim_jax/workdir.py): `<workdir>/checkpoints/<step>/{state, data, meta}`.
Orbax writes each step to a temporary directory (or, on GCS, commits it with a
marker object) so a process killed mid-save leaves the previous checkpoint as
the latest; stale temporaries are removed on the next start.

`restore_latest` resumes from the newest checkpoint that restores: one that
does not (truncated tensor files, emptied metadata, a stray empty step
directory) is moved to `<workdir>/unreadable_checkpoints/`, never deleted, and
named in one warning line.
"""

from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from mim_jax import io, workdir as layout
from mim_jax.errors import CheckpointMismatchError
from mim_jax.trainer.tree import flatten_with_names

# Errors that say a checkpoint's files are damaged or missing (tensorstore reports
# data loss as ValueError; orbax wraps it in a bare Exception). Storage that is
# unreachable or refuses access is not damage: that stops the run instead of
# moving a good checkpoint aside.
_DAMAGE = (ValueError, KeyError, OSError, layout.UnreadableCheckpoint)
_NOT_DAMAGE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
               "RESOURCE_EXHAUSTED", "Forbidden", "permission denied", "credentials")
# grain refuses an input position saved by another pipeline with these messages.
_GRAIN_MISMATCH = "in checkpoint does not match"


class Checkpointer:
  """Saves and restores {state, data iterator, meta} with an orbax CheckpointManager."""

  def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
    self.workdir = io.absolute(workdir)  # orbax needs absolute paths
    self.directory = layout.checkpoints_dir(self.workdir)
    self._keep, self._async = keep, async_save
    self.manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(
        io.to_path(self.directory), options=options,
        item_handlers={layout.STATE: ocp.StandardCheckpointHandler(),
                       layout.DATA: grain.checkpoint.CheckpointHandler(),
                       layout.META: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(**{
        layout.STATE: ocp.args.StandardSave(state),
        layout.DATA: grain.checkpoint.CheckpointSave(data_iterator),
        layout.META: ocp.args.JsonSave(meta)}), force=True)

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with `step` (read without touching the state)."""
    return layout.read_meta(io.join(self.directory, str(step)))

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
    stored = self.manager.item_metadata(step)[layout.STATE]
    if stored is None:
      raise layout.UnreadableCheckpoint("it has no state")
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
    items = {layout.STATE: ocp.args.StandardRestore(abstract_state),
             layout.META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[layout.DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as error:
      if _GRAIN_MISMATCH not in str(error):
        raise
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} was written by another input "
          f"pipeline (grain: {_first_line(error).rstrip('.')}; the seed, data source, split "
          f"or data.worker_count changed); resume with the original settings or use another "
          f"--workdir (the checkpoint was left untouched)") from None
    return restored[layout.STATE], restored[layout.META]

  def restore_latest(self, frozen_meta: dict[str, Any],
                     restore_one: Callable[[int], Any]) -> tuple[int, Any] | None:
    """(step, what `restore_one(step)` returned) for the newest checkpoint that restores.

    Every step is checked against this run first (frozen inputs, shapes): a
    mismatch stops the run. A step that does not restore is moved aside by
    process 0 and named in a warning; None when no checkpoint is left.
    """
    layout.quiet_late_read_callbacks()
    while (step := self.latest_step()) is not None:
      try:
        self.check_frozen(step, frozen_meta)
        return step, restore_one(step)
      except CheckpointMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        if not _is_damage(error):
          raise
        self._set_aside(step, error)
    return None

  def _set_aside(self, step: int, error: BaseException) -> None:
    """Moves an unreadable step out of orbax's sight (so new saves and the
    retention policy ignore it), keeping every byte."""
    source = io.join(self.directory, str(step))
    target = layout.unreadable_dir(self.workdir, step)
    if jax.process_index() == 0:
      io.move(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mim_jax set aside checkpoint {step}")
    logging.warning("The checkpoint at step %d in %s does not restore (%s); moved it to %s "
                    "and resuming from the one before", step, self.directory,
                    _first_line(_root_cause(error)), target)
    self.manager.close()
    self.manager = self._new_manager()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _is_damage(error: BaseException) -> bool:
  """Whether `error` (or what caused it) says the checkpoint's files are damaged."""
  chain = []
  while error is not None and len(chain) < 16:
    chain.append(error)
    error = error.__cause__ or error.__context__
  if any(code in str(e) for e in chain for code in _NOT_DAMAGE):
    return False
  return any(isinstance(e, _DAMAGE) for e in chain)


def _root_cause(error: BaseException) -> BaseException:
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _describe(source: dict[str, Any] | None) -> str:
  if not source:
    return "(none)"
  return f"{source.get('path')!r} (sha256 {str(source.get('sha256'))[:12]}...)"


def _first_line(error: BaseException) -> str:
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return (lines[0] if lines else type(error).__name__)[:200]
