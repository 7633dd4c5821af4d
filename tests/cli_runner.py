"""Runs command lines of mim_jax's CLIs at the cost of one import: a fork server for tests.

`python -m mim_jax.train ...` spends seconds importing JAX, flax, orbax, grain and
TFDS before it looks at its flags. A table of command lines that each fail at the
flags or the config would pay that for every row. Here one process (started by
`CliRunner`) imports those libraries once, then forks a child per command line;
the child runs the CLI module as `python -m` would (`runpy`, `__name__ ==
'__main__'`, its own flags), with stdout and stderr in files, and exits as the
interpreter does (garbage collected, atexit handlers run), so whatever a real run
prints at exit is seen.

The server imports no CLI module itself (each defines its flags when it runs as
`__main__` in a child) and initialises no JAX backend, so no thread exists when it
forks: a child may compile and train like a fresh process.

Protocol (one JSON object per line): request {"module", "args", "cwd", "timeout"};
reply {"returncode", "stdout", "stderr", "seconds"}. A child still running at its
timeout is killed with its process group (returncode -9).
"""

import atexit
import dataclasses
import gc
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Everything the CLIs import that takes time, none of which defines flags.
PRELOADED = ("jax", "flax", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets",
             "ml_collections.config_flags", "absl.app", "mim_jax.cli", "mim_jax.config_checks",
             "mim_jax.config_defaults", "mim_jax.tasks.registry", "mim_jax.trainer.loop",
             "mim_jax.trainer.distributed", "mim_jax.step_breakdown", "mim_jax.analysis",
             "mim_jax.convert")


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str
  seconds: float


class CliRunner:
  """The client: `run('mim_jax.train', [...])` -> Result, as `python -m mim_jax.train ...`."""

  def __init__(self, env: dict[str, str] | None = None):
    self._process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

  def run(self, module: str, args: list[str], *, cwd: str | None = None,
          timeout: float = 300.0) -> Result:
    request = {"module": module, "args": [str(a) for a in args], "cwd": cwd or os.getcwd(),
               "timeout": timeout}
    self._process.stdin.write(json.dumps(request) + "\n")
    self._process.stdin.flush()
    reply = self._process.stdout.readline()
    if not reply:
      raise RuntimeError(f"the CLI runner exited (status {self._process.wait()})")
    return Result(**json.loads(reply))

  def close(self) -> None:
    self._process.stdin.close()
    self._process.wait(timeout=60)


# ----------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------
def _serve() -> None:
  import importlib  # pylint: disable=import-outside-toplevel
  for name in PRELOADED:
    importlib.import_module(name)
  protocol = sys.stdout
  for line in sys.stdin:
    request = json.loads(line)
    scratch = tempfile.mkdtemp(prefix="cli_runner_")
    out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
    start = time.perf_counter()
    protocol.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _run_child(request, out, err)  # never returns: os._exit
    returncode = _wait(pid, request["timeout"])
    reply = {"returncode": returncode, "stdout": _read(out), "stderr": _read(err),
             "seconds": time.perf_counter() - start}
    shutil.rmtree(scratch)
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()


def _run_child(request: dict, out: str, err: str) -> None:
  """In the forked child: the module as `python -m module args...`, then a normal exit."""
  os.setpgrp()  # grain workers and other children die with it on a timeout
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  sys.stdin = open(os.devnull, encoding="utf-8")  # the protocol stays the server's
  os.chdir(request["cwd"])
  sys.argv = [request["module"], *request["args"]]
  try:
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    code = 0
  except SystemExit as exit_:
    code = exit_.code
  except BaseException:  # pylint: disable=broad-exception-caught  # as the interpreter does
    traceback.print_exc()
    code = 1
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  # What an exit shows: finalizers of what the run left behind, then the atexit handlers
  # (multiprocessing's stops grain's workers). Tearing down 2000 modules shows nothing
  # and takes seconds: skipped.
  gc.collect()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)


def _wait(pid: int, timeout: float) -> int:
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.killpg(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      return -signal.SIGKILL
    time.sleep(0.01)


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


if __name__ == "__main__":
  _serve()
