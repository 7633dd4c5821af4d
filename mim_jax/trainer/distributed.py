"""Multi-process start-up: `jax.distributed.initialize` before any other JAX call.

One JAX process runs per host (per GPU under SLURM); they find each other
through a coordinator (process 0). `initialize` decides how:

  * explicit `coordinator_address`, `num_processes`, `process_id` (the local
    launcher, a hand-started cluster), as flags or, for a launcher that starts
    one command line everywhere, as the variables `MIM_JAX_COORDINATOR_ADDRESS`,
    `MIM_JAX_NUM_PROCESSES`, `MIM_JAX_PROCESS_ID`: initialize with them;
  * a Colab (or Kaggle) runtime: one host, a single process, whatever TPU
    metadata it shows;
  * a cluster that started several processes, a Cloud TPU VM (pod slice or
    multislice) or a SLURM step with more than one task: initialize with no
    arguments, JAX reads the cluster's own description;
  * otherwise: a single process, nothing to do.

JAX aborts the whole process (no Python exception) when the coordinator cannot
be reached in time, so a watchdog thread reports that first, as a one-line
`error:` naming the address, and exits with status 2.
"""

import collections
import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from mim_jax.errors import ConfigError, UserError

DEFAULT_TIMEOUT_S = 300
# JAX's own deadline comes this much later, so the watchdog's message comes first.
_JAX_TIMEOUT_MARGIN_S = 60
_WATCHDOG_EXIT_STATUS = 2
# What JAX's SLURM detection reads: set in tasks that srun started.
_SLURM_TASK_VARS = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
# The multi-process flags' environment form (a launcher exports them per process).
ENVIRON_FLAGS = (("coordinator_address", "MIM_JAX_COORDINATOR_ADDRESS"),
                 ("num_processes", "MIM_JAX_NUM_PROCESSES"),
                 ("process_id", "MIM_JAX_PROCESS_ID"))
_FROM_ENVIRON = "MIM_JAX_* variables"
# Set in every Colab runtime (and in Kaggle's, built on Colab's image): one host.
_NOTEBOOK_RUNTIME_VARS = ("COLAB_RELEASE_TAG", "COLAB_GPU", "KAGGLE_KERNEL_RUN_TYPE")


class CoordinatorError(UserError):
  """The processes could not reach the coordinator, or each other, in time."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """What this process found: its index, the process count, local and global devices."""
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int
  platform: str
  how: str  # 'single process[, Colab]', 'explicit flags', 'MIM_JAX_* variables', 'slurm', 'tpu'
  coordinator: str | None = None

  def describe(self) -> str:
    where = f", coordinator {self.coordinator}" if self.coordinator else ""
    return (f"{self.process_count} process(es) ({self.how}{where}) | {self.local_devices} "
            f"local / {self.global_devices} global {self.platform} devices")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """'tpu' or 'slurm' when a cluster started this process as one of several, else None.

  A Colab runtime is one host even on a TPU (whose VM may describe a slice in
  its metadata): None, so that `python -m mim_jax.train` runs as one process.
  """
  environ = os.environ if environ is None else environ
  if on_notebook_runtime(environ):
    return None
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if environ is os.environ and _on_cloud_tpu_vm():
    return "tpu"  # a GCE TPU VM describes its slice in metadata; JAX reads it
  if environ.get("SLURM_JOB_ID") and _int(environ.get("SLURM_NTASKS")) > 1:
    return "slurm"
  return None


def on_notebook_runtime(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this is a Colab (or Kaggle) runtime, from its environment variables."""
  environ = os.environ if environ is None else environ
  return any(name in environ for name in _NOTEBOOK_RUNTIME_VARS)


def flags_from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """The multi-process flags a launcher exported as MIM_JAX_* variables ({} if none).

  Raises:
    ConfigError: only some of the variables set, or values that are not valid.
  """
  environ = os.environ if environ is None else environ
  given = {flag: environ[name] for flag, name in ENVIRON_FLAGS if environ.get(name)}
  if not given:
    return {}
  if len(given) < len(ENVIRON_FLAGS):
    missing = ", ".join(name for flag, name in ENVIRON_FLAGS if flag not in given)
    raise ConfigError(f"multi-process variables are incomplete: set {missing} too (or unset "
                      f"the MIM_JAX_* variables and pass the flags)")
  for flag, name in ENVIRON_FLAGS[1:]:
    if not given[flag].isdigit():
      raise ConfigError(f"{name}={given[flag]!r} must be a non-negative integer")
    given[flag] = int(given[flag])
  if not 0 <= given["process_id"] < given["num_processes"]:
    raise ConfigError(f"MIM_JAX_PROCESS_ID={given['process_id']} must be in "
                      f"[0, {given['num_processes']}) for MIM_JAX_NUM_PROCESSES="
                      f"{given['num_processes']}")
  return given


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Topology:
  """Starts the JAX multi-process runtime when there is more than one process.

  Must run before anything else touches JAX devices. Returns this process's
  topology (devices are initialised by then) and logs it on process 0.

  Raises:
    ConfigError: incomplete or invalid flags, or processes whose device counts
      disagree with each other or with `num_processes`.
    CoordinatorError: the coordinator's port is taken (process 0) or nothing
      answers at its address within `timeout_s` (other processes).
  """
  if timeout_s <= 0:
    raise ConfigError(f"--distributed_timeout_s={timeout_s} must be positive")
  explicit_how = "explicit flags"
  if coordinator_address is None and num_processes is None and process_id is None:
    from_environ = flags_from_environ()
    if from_environ:
      coordinator_address = from_environ["coordinator_address"]
      num_processes = from_environ["num_processes"]
      process_id = from_environ["process_id"]
      explicit_how = _FROM_ENVIRON
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and len(given) < len(explicit):
    missing = ", ".join(k for k in explicit if k not in given)
    raise ConfigError(f"multi-process flags are incomplete: set {missing} too (every process "
                      f"gets the same --coordinator_address and --num_processes and its own "
                      f"--process_id)")
  if given and num_processes > 1:
    host, port = parse_address(coordinator_address)
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                        f"--num_processes={num_processes}")
    if process_id == 0:
      check_port_free(port, coordinator_address)
    else:
      wait_for_coordinator(host, port, coordinator_address, timeout_s)
    how = explicit_how
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif given:  # --num_processes=1: nothing to coordinate
    if num_processes != 1 or process_id != 0:
      raise ConfigError(f"--num_processes={num_processes} --process_id={process_id}: need "
                        f"num_processes >= 1 and 0 <= process_id < num_processes")
    return _topology("single process", None)
  else:
    cluster = detect_cluster()
    if cluster is None:
      return _topology("single process, Colab" if on_notebook_runtime() else "single process",
                       None)
    if cluster == "slurm" and not all(k in os.environ for k in _SLURM_TASK_VARS):
      raise ConfigError(f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this process is not a "
                        f"task of a job step; start it with srun (see launch/gpu_slurm.sbatch)")
    how, kwargs = cluster, {}
  if local_device_ids:
    kwargs["local_device_ids"] = list(local_device_ids)

  # CPU processes need cross-process collectives (gloo is also JAX 0.10's default).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  watchdog = _Watchdog(timeout_s, coordinator_address, num_processes, process_id, how)
  try:
    jax.distributed.initialize(
        initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S, **kwargs)
    jax.devices()  # the processes exchange their devices here: inside the watchdog's window
  finally:
    watchdog.cancel()
  coordinator = coordinator_address or _jax_coordinator_address()
  check_devices(jax.devices(), jax.process_count(), num_processes)
  return _topology(how, coordinator)


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' (or '[v6]:port') -> (host, port); ConfigError if malformed."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={address!r} must be HOST:PORT, e.g. "
                      f"10.0.0.2:8476 (the host of process 0 and a free port)")
  return host, int(port)


def check_port_free(port: int, address: str) -> None:
  """Process 0 serves the coordinator on `port` of every interface: it must be free."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise CoordinatorError(f"process 0 cannot serve the coordinator {address}: port {port} "
                             f"is in use on this host ({error.strerror}); choose another "
                             f"port in --coordinator_address") from None


def wait_for_coordinator(host: str, port: int, address: str, timeout_s: float) -> None:
  """Polls until something listens at host:port; CoordinatorError after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  last_error = "no answer"
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(
          min(2.0, deadline - time.monotonic()), 0.1)):
        return
    except OSError as error:
      last_error = error.strerror or str(error) or type(error).__name__
    if time.monotonic() >= deadline:
      raise CoordinatorError(
          f"no coordinator answered at {address} within {timeout_s:g} s "
          f"({last_error}); start process 0 with the same --coordinator_address, check the "
          f"host and port are reachable from here, or raise --distributed_timeout_s")
    time.sleep(0.25)


def check_devices(devices: Iterable[Any], process_count: int,
                  expected_processes: int | None = None) -> None:
  """Every process must hold devices, the same number each, and be counted once."""
  per_process = collections.Counter(d.process_index for d in devices)
  if expected_processes is not None and process_count != expected_processes:
    raise ConfigError(f"--num_processes={expected_processes} but JAX reports {process_count} "
                      f"processes; give every process the same --num_processes")
  missing = sorted(set(range(process_count)) - set(per_process))
  if missing:
    raise ConfigError(f"{process_count} processes but process(es) {missing} found no devices; "
                      f"check each host's accelerators (or --local_device_ids)")
  if len(set(per_process.values())) > 1:
    counts = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
    raise ConfigError(f"the processes hold different numbers of devices ({counts}); the global "
                      f"batch is split evenly, so give every process the same number")


def _topology(how: str, coordinator: str | None) -> Topology:
  topology = Topology(process_index=jax.process_index(), process_count=jax.process_count(),
                      local_devices=jax.local_device_count(), global_devices=jax.device_count(),
                      platform=jax.default_backend(), how=how, coordinator=coordinator)
  if topology.process_index == 0:
    logging.info("Distributed: %s", topology.describe())
  return topology


class _Watchdog:
  """Ends the process with a clear error if initialisation outlives its deadline."""

  def __init__(self, timeout_s: float, address: str | None, num_processes: int | None,
               process_id: int | None, how: str):
    self._message = self._describe(address, num_processes, process_id, how)
    self._timer = threading.Timer(timeout_s, self._fire)
    self._timer.daemon = True
    self._timer.start()

  @staticmethod
  def _describe(address, num_processes, process_id, how) -> str:
    if how in ("explicit flags", _FROM_ENVIRON):
      return (f"process {process_id}: not all {num_processes} processes joined through the "
              f"coordinator at {address} in time; start every process with the same "
              f"--coordinator_address and --num_processes and a distinct --process_id, or "
              f"raise --distributed_timeout_s")
    hint = ("start the job's tasks with srun" if how == "slurm"
            else "run the same command on every worker (--worker=all)")
    return (f"the {how} cluster's processes did not all join in time; {hint}, or raise "
            f"--distributed_timeout_s")

  def _fire(self) -> None:
    print(f"error: {self._message}", file=sys.stderr, flush=True)
    os._exit(_WATCHDOG_EXIT_STATUS)  # JAX is blocked in C++: no exception can reach it

  def cancel(self) -> None:
    self._timer.cancel()


def _jax_coordinator_address() -> str | None:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, "coordinator_address", None)


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _int(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0
