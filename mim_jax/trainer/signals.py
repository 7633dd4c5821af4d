"""Stopping cleanly: SIGTERM (preemption, maintenance) and SIGINT (Ctrl-C) save, then stop.

The loop asks `check(step)` after every step; once a stop was requested it
saves the step it is at and ends: exit status 0 after SIGTERM (the scheduler
restarts the job), `Interrupted` (exit status 130) after Ctrl-C. A second
Ctrl-C ends the process at once, without saving.

With several processes JAX's preemption service catches SIGTERM and `check`
returns True on every process at the same step: one process saving alone
would wait forever for the others. Ctrl-C then becomes a SIGTERM to this
process, so it takes the same synchronised path.
"""

import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped the run after saving; the message says where. CLIs exit with 130."""


class StopSignals:
  """Turns SIGTERM and SIGINT into a request the loop checks at every step.

  `requested` is the name of the first signal ('SIGTERM' or 'SIGINT'), or None.
  Handlers are installed for the life of the object (`close` restores the
  previous ones); outside the main thread none can be, and signals keep their
  default effect. `start_step`: the step a resumed run starts at (JAX's preemption
  sync point counts the steps this process ran).
  """

  def __init__(self, start_step: int = 0):
    self.requested: str | None = None
    self._start_step = start_step  # JAX's preemption sync counts steps from the process start
    self._previous: dict[int, Any] = {}
    self._synced = jax.process_count() > 1 and _preemption_service_running()
    handled = [signal.SIGINT] if self._synced else [signal.SIGTERM, signal.SIGINT]
    for signum in handled:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        break

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if name == "SIGINT" and self.requested == "SIGINT":
      _say("error: interrupted again: exiting at once, without saving; a rerun resumes from "
           "the last saved checkpoint")
      os._exit(INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access
    if self.requested is None:
      self.requested = name
      _say(f"{name} received: saving at the end of this step, then stopping (Ctrl-C again "
           f"exits at once, without saving)")
    if self._synced and name == "SIGINT":  # every process stops at the same step
      os.kill(os.getpid(), signal.SIGTERM)

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it at every step, on every process."""
    if self._synced and self.requested in (None, "SIGINT"):
      if multihost_utils.reached_preemption_sync_point(step - self._start_step):
        self.requested = self.requested or "SIGTERM"
        return True
      return False
    return self.requested is not None

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _say(line: str) -> None:
  """One line on stderr, written directly: a signal may arrive in the middle of a print."""
  os.write(2, (line + "\n").encode())


def _preemption_service_running() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
