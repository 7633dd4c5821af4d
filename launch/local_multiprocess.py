#!/usr/bin/env python3
r"""Runs N `python -m mim_jax.train` processes on this machine, as N hosts would.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/mae_vit_tiny.py:demo --workdir=/tmp/mae_2proc

Each process gets `--coordinator_address=localhost:PORT --num_processes=N
--process_id=i` and D fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=D), so the run uses the multi-process
code paths: per-process data, global batches assembled from local pieces,
collectives across processes (gloo), every process in each checkpoint. Output
lines are prefixed with [i]. If a process fails, the others get
`--grace_s` seconds to end on their own and are then stopped; the exit status
is that of the first process that failed (0 if none did).
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- TRAIN_FLAGS...")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = any free one")
  parser.add_argument("--module", default="mim_jax.train", help="what each process runs")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="after a failure, seconds the others get to end on their own")
  if "--" in argv:
    split = argv.index("--")
    args, forwarded = parser.parse_args(argv[:split]), argv[split + 1:]
  else:
    args, forwarded = parser.parse_known_args(argv)
  args.forwarded = forwarded
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be at least 1")
  if not forwarded:
    parser.error("give the training flags after --, e.g. -- --config=configs/mae_vit_tiny.py:demo "
                 "--workdir=/tmp/run")
  clashes = [f for f in forwarded if f.split("=")[0] in OWN_FLAGS]
  if clashes:
    parser.error(f"{' '.join(clashes)}: this launcher sets {', '.join(OWN_FLAGS)} itself")
  return args


def process_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(xla_flags + [f"{DEVICE_COUNT_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def pump(index: int, stream, lock: threading.Lock) -> None:
  """Copies a process's output to ours, line by line, prefixed with [index]."""
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"[{index}] {line}" if line.endswith("\n") else f"[{index}] {line}\n")
      sys.stdout.flush()
  stream.close()


def stop(procs: list[subprocess.Popen], grace_s: float) -> None:
  """Waits `grace_s` for the running ones, then SIGTERM, then SIGKILL."""
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)
  for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
    running = [p for p in procs if p.poll() is None]
    for proc in running:
      proc.send_signal(sig)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(p.poll() is None for p in running):
      time.sleep(0.1)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  port = args.port or free_port()
  address = f"localhost:{port}"
  env = process_env(args.devices_per_process)
  commands = [[sys.executable, "-m", args.module, *args.forwarded,
               f"--coordinator_address={address}", f"--num_processes={args.num_processes}",
               f"--process_id={i}"] for i in range(args.num_processes)]
  print(f"Starting {args.num_processes} processes x {args.devices_per_process} CPU devices, "
        f"coordinator {address}, PYTHONPATH={REPO}:", flush=True)
  for i, command in enumerate(commands):
    print(f"  [{i}] XLA_FLAGS='{env['XLA_FLAGS']}' JAX_PLATFORMS=cpu "
          f"{shlex.join(command)}", flush=True)

  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i, command in enumerate(commands):
      proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
      procs.append(proc)
      pumps.append(threading.Thread(target=pump, args=(i, proc.stdout, lock), daemon=True))
      pumps[-1].start()
    first_failure = None
    while any(p.poll() is None for p in procs):
      failed = [(i, p.returncode) for i, p in enumerate(procs)
                if p.returncode not in (None, 0)]
      if failed:
        first_failure = failed[0]
        break
      time.sleep(0.1)
    if first_failure is not None:
      stop(procs, args.grace_s)
  except KeyboardInterrupt:
    stop(procs, 0.0)
    first_failure = (None, 130)
  for thread in pumps:
    thread.join(timeout=5)
  if first_failure is None:
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    first_failure = failed[0] if failed else None
  if first_failure is None:
    print(f"All {args.num_processes} processes finished.", flush=True)
    return 0
  index, status = first_failure
  if index is not None:
    others = {i: p.returncode for i, p in enumerate(procs) if i != index}
    print(f"Process {index} failed with exit status {status}; the others ended with "
          f"{others}.", file=sys.stderr, flush=True)
  # A process killed by a signal has a negative code: report it as a shell would.
  return status if status > 0 else 128 - status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
