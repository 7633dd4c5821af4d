"""Multi-process training simulated on one machine: local processes with fake CPU devices.

The end-to-end runs go through launch/local_multiprocess.py (2 processes x 2
devices) and plain `python -m mim_jax.train` (1 process), each with its own
XLA_FLAGS; this test process keeps conftest's 8 devices.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_teacher
from mim_jax.errors import ConfigError
from mim_jax.trainer import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
LAUNCHER = os.path.join(LAUNCH, "local_multiprocess.py")
# LLVM -O0 compiles the tiny steps several times faster; every run here uses it.
XLA_FLAGS = "--xla_backend_optimization_level=0"
STEPS = 6
RTOL = 1e-5


def tiny_flags(demo_dir, method="mae", teacher=None, **overrides):
  """CLI flags for conftest's tiny model (32 px, 2 blocks of 32) on the demo photographs."""
  values = {"image_size": 32, "batch_size": 16, "total_steps": STEPS, "warmup_steps": 2,
            "log_every": 1, "checkpoint_every": 3, "image_every": 0, "model.variant": "",
            "model.patch_size": 8, "model.width": 32, "model.depth": 2, "model.num_heads": 4,
            "mae.decoder.width": 16, "mae.decoder.num_heads": 2, "data.worker_count": 0,
            "data.data_dir": demo_dir, "mesh.fsdp_min_size": 64}
  if method == "d2mae":  # conftest.tiny_distill_config: block 3 distilled to teacher layer 3
    values.update({"mae.decoder_layer": 1, "distill.teacher": teacher,
                   "distill.attn_pairs": "((3,3),)"})
  values.update(overrides)
  config = os.path.join(REPO, "configs", f"{method}_vit_tiny.py")
  return [f"--config={config}:demo"] + [f"--config.{k}={v}" for k, v in values.items()]


def subprocess_env(devices=None):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}"
                                  if devices else "")
  return env


def start(command, devices=None):
  return subprocess.Popen(command, env=subprocess_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=REPO)


def launch(workdir, flags, num_processes=2, devices=2):
  """launch/local_multiprocess.py: `num_processes` x `devices` fake CPU devices."""
  return start([sys.executable, LAUNCHER, f"--num_processes={num_processes}",
                f"--devices_per_process={devices}", "--grace_s=30", "--",
                f"--workdir={workdir}", *flags])


def train_one_process(workdir, flags, devices):
  return start([sys.executable, "-m", "mim_jax.train", f"--workdir={workdir}", *flags], devices)


def finish(proc, timeout=600):
  output, _ = proc.communicate(timeout=timeout)
  return proc.returncode, output


def read_metrics(workdir):
  """[record, ...] in metrics.jsonl order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def by_step(records):
  """{step: record}, the last record of a step winning (a resumed run re-logs it)."""
  return {r["step"]: {k: v for k, v in r.items() if k not in ("images_per_sec", "sec_per_step")}
          for r in records}


def assert_same_losses(got, want, steps):
  for step in steps:
    assert set(got[step]) == set(want[step])
    for name in want[step]:
      np.testing.assert_allclose(got[step][name], want[step][name], rtol=RTOL,
                                 err_msg=f"{name} at step {step}")


def free_port():
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  from mim_jax.data.sources import build_demo_dataset
  path = str(tmp_path_factory.mktemp("demo_tfds"))
  build_demo_dataset(path)  # once, before several processes would race to build it
  return path


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tmp_path_factory, demo_dir):
  """method -> the 2 x 2 run and the 1 x 4 run of the same config (run once, on demand)."""
  done = {}

  def run(method):
    if method not in done:
      root = tmp_path_factory.mktemp(method)
      teacher = make_teacher(root / "teacher.npz") if method == "d2mae" else None
      flags = tiny_flags(demo_dir, method, teacher)
      # MAE: parameters sharded over the 4 devices of both processes, and a figure;
      # D²-MAE: a 2 x 2 mesh. The reference: 4 data-parallel devices.
      two_flags = (["--config.mesh.data=1", "--config.mesh.fsdp=4", f"--config.image_every={STEPS}"]
                   if method == "mae" else ["--config.mesh.data=2", "--config.mesh.fsdp=2"])
      two_dir, one_dir = str(root / "two_processes"), str(root / "one_process")
      started = time.time()
      two = launch(two_dir, flags + two_flags)
      one = train_one_process(one_dir, flags, devices=4)
      (two_rc, two_out), (one_rc, one_out) = finish(two), finish(one)
      assert two_rc == 0, two_out[-5000:]
      assert one_rc == 0, one_out[-5000:]
      done[method] = SimpleNamespace(two=two_dir, one=one_dir, output=two_out, flags=flags,
                                     seconds=time.time() - started)
    return done[method]

  return run


# ----------------------------------------------------------------------------
# 2 processes x 2 devices == 1 process x 4 devices
# ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "d2mae"])
def test_two_processes_match_one_process(runs, method):
  run = runs(method)
  two, one = read_metrics(run.two), read_metrics(run.one)
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # written once: by process 0
  assert_same_losses(by_step(two), by_step(one), range(1, STEPS + 1))
  if method == "d2mae":
    assert "loss_attn" in two[0]
  lines = run.output.splitlines()
  assert any(l.startswith("[0]") and "Distributed: 2 process(es) (explicit flags" in l
             and "2 local / 4 global cpu devices" in l for l in lines)
  assert any(l.startswith("[0]") and f"step {STEPS}/{STEPS}" in l for l in lines)
  assert not any(l.startswith("[1]") and ("step 1/" in l or "Distributed:" in l) for l in lines)
  # Every process wrote its part of the checkpoint.
  data_dir = os.path.join(run.two, "checkpoints", str(STEPS), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  if method == "mae":  # from parameters sharded across both processes
    assert os.listdir(os.path.join(run.two, "reconstructions")) == [f"step_{STEPS:08d}.png"]


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one_on_another_mesh(runs, tmp_path):
  run = runs("mae")  # written by 2 processes on a 1 x 4 (fsdp) mesh
  workdir = str(tmp_path / "resumed")
  shutil.copytree(run.two, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # back to step 3
  uninterrupted = by_step(read_metrics(run.two))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in read_metrics(run.two)[:3]:
      f.write(json.dumps(record) + "\n")

  proc = train_one_process(workdir, run.flags + ["--config.mesh.data=1", "--config.mesh.fsdp=2"],
                           devices=2)
  rc, output = finish(proc)
  assert rc == 0, output[-5000:]
  assert "Checkpoint written by 2 processes, resumed by 1" in output
  assert "Resumed from step 3" in output
  resumed = by_step(read_metrics(workdir))
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert_same_losses(resumed, uninterrupted, range(4, STEPS + 1))


# ----------------------------------------------------------------------------
# The batch order does not depend on the process count
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_global_batches_do_not_depend_on_the_process_count(demo_dir, worker_count):
  from mim_jax.config_defaults import recipe
  from mim_jax.data import pipeline
  data = recipe("demo").data
  data.update(data_dir=demo_dir, worker_count=worker_count)

  def loader(index, count):
    return pipeline.make_train_loader(data, pipeline.DataSpec.single_view(16), global_batch_size=8,
                                      seed=3, process_index=index, process_count=count)

  def take(iterator, n):
    return [np.array(next(iterator)["image"]) for _ in range(n)]

  one = take(iter(loader(0, 1)), 5)
  halves = [loader(p, 2) for p in range(2)]
  two = [take(iter(h), 5) for h in halves]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([two[0][step], two[1][step]]), one[step])
  # Resuming on another process count: each half continues at global batch 3.
  for p, half in enumerate(halves):
    iterator = half.iterator_at(3)
    np.testing.assert_array_equal(take(iterator, 1)[0], one[3][p * 4:(p + 1) * 4])
  # And in the same layout iterator_at(3) is the state grain saves after 3 batches.
  stepped = iter(halves[1])
  take(stepped, 3)
  assert json.loads(halves[1].iterator_at(3).get_state()) == json.loads(stepped.get_state())


# ----------------------------------------------------------------------------
# Bad input: one-line errors before training starts, in bounded time
# ----------------------------------------------------------------------------
def alone_in_a_two_process_run(tmp_path, demo_dir, process_id, timeout_s):
  """(address, exit code, output) of process `process_id` of 2, started without the other."""
  address = f"localhost:{free_port()}"  # nothing listens there unless process 0 does
  rc, output = finish(train_one_process(
      str(tmp_path), tiny_flags(demo_dir) + [f"--coordinator_address={address}",
                                             "--num_processes=2", f"--process_id={process_id}",
                                             f"--distributed_timeout_s={timeout_s}"],
      devices=1), timeout=120)
  return address, rc, output


def test_unreachable_coordinator_is_a_timeout_naming_the_address(tmp_path, demo_dir):
  started = time.time()
  address, rc, output = alone_in_a_two_process_run(tmp_path, demo_dir, process_id=1,
                                                   timeout_s=2)
  assert rc == 2, output[-3000:]
  assert f"error: no coordinator answered at {address} within 2 s" in output
  assert time.time() - started < 100


def test_missing_processes_end_in_a_timeout_naming_the_coordinator(tmp_path, demo_dir):
  address, rc, output = alone_in_a_two_process_run(tmp_path, demo_dir, process_id=0,
                                                   timeout_s=3)
  assert rc == 2, output[-3000:]
  assert (f"error: process 0: not all 2 processes joined through the coordinator at {address} "
          "in time") in output
  assert "Traceback" not in output


@pytest.mark.slow
def test_batch_not_divisible_by_process_count_fails_before_training(tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  rc, output = finish(launch(workdir, tiny_flags(demo_dir, batch_size=15), devices=1))
  assert rc == 2, output[-3000:]
  for index in range(2):
    assert (f"[{index}] error: batch_size 15 is not divisible by the 2 processes; use a multiple "
            f"of 2") in output
  assert "Process 0 failed with exit status 2" in output or "Process 1 failed" in output
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_processes=2), "set --coordinator_address, --process_id too"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, 2\)"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=1), "must be HOST:PORT"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=0, timeout_s=0),
     "must be positive"),
])
def test_bad_flags_are_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    distributed.initialize(**kwargs)


def test_coordinator_port_in_use_and_unreachable_coordinator():
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(distributed.CoordinatorError, match=f"port {port} is in use"):
      distributed.initialize(f"localhost:{port}", 2, 0)
  started = time.monotonic()
  with pytest.raises(distributed.CoordinatorError,
                     match=f"no coordinator answered at localhost:{port} within 1 s"):
    distributed.initialize(f"localhost:{port}", 2, 1, timeout_s=1)
  assert time.monotonic() - started < 10


def test_device_counts_must_agree_with_the_processes():
  def devices(*per_process):
    return [SimpleNamespace(process_index=p) for p, n in enumerate(per_process) for _ in range(n)]

  distributed.check_devices(devices(2, 2), 2, expected_processes=2)
  with pytest.raises(ConfigError, match="--num_processes=4 but JAX reports 2 processes"):
    distributed.check_devices(devices(2, 2), 2, expected_processes=4)
  with pytest.raises(ConfigError, match=r"process 0: 2, process 1: 4"):
    distributed.check_devices(devices(2, 4), 2)
  with pytest.raises(ConfigError, match=r"process\(es\) \[2\] found no devices"):
    distributed.check_devices(devices(2, 2), 3)


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
])
def test_cluster_detection(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def test_single_process_needs_nothing():
  topology = distributed.initialize()
  assert (topology.process_count, topology.how, topology.global_devices) == (
      1, "single process", 8)


# ----------------------------------------------------------------------------
# launch/: each script says what it will do and refuses missing settings
# ----------------------------------------------------------------------------
def run_script(command, **env):
  full_env = {k: v for k, v in os.environ.items()
              if k not in ("PROJECT", "ZONE", "TPU_NAME", "CONFIG", "WORKDIR", "SLURM_JOB_ID")}
  return subprocess.run(command, env={**full_env, **env}, capture_output=True, text=True,
                        timeout=60, cwd=REPO)


@pytest.mark.parametrize("argv,message", [
    ([], "give the training flags after --"),
    (["--", "--config=x", "--process_id=1"], "this launcher sets"),
    (["--num_processes=0", "--", "--config=x"], "must be at least 1"),
])
def test_local_launcher_refuses_bad_arguments(argv, message):
  result = run_script([sys.executable, LAUNCHER, *argv])
  assert result.returncode == 2 and message in result.stderr


# launch/tpu_pod.sh and launch/gpu_slurm.sbatch: tests/test_launch.py.


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, demo_dir):
  import psutil  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  launcher = launch(workdir, tiny_flags(demo_dir, total_steps=10_000, checkpoint_every=10_000),
                    devices=1)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and launcher.poll() is None and not (
      os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    time.sleep(0.2)
  workers = [p for p in psutil.Process(launcher.pid).children()
             if "--process_id=1" in p.cmdline()]
  assert len(workers) == 1, "process 1 not found (did the run end early?)"
  workers[0].send_signal(signal.SIGTERM)  # only process 1: as a maintenance event would
  rc, output = finish(launcher)
  assert rc == 0, output[-5000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 10_000
  assert f"SIGTERM received: saved step {saved[0]}" in output
  data_dir = os.path.join(workdir, "checkpoints", str(saved[0]), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
