"""Where users run mim_jax: topology-aware meshes, launchers (TPU pod, SLURM), Colab, one URL.

The TPU pod launcher is tested for real against tests/fake_gcloud/gcloud: a
stand-in `gcloud` on PATH whose slice workers are local processes (one CPU
device each), so launch/tpu_pod.sh and launch/tpu_worker.sh run unchanged:
create, install, run, stop (SIGTERM: a checkpoint), a simulated preemption,
resume (recreate, install, run: the run continues from that checkpoint), stop.
"""

import dataclasses
import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax.errors import ConfigError
from mim_jax.trainer import distributed, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "gpu_slurm.sbatch")
FAKE_GCLOUD = os.path.join(REPO, "tests", "fake_gcloud")


# ----------------------------------------------------------------------------
# Meshes: the TPU torus on one slice, slices along 'data' on several
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What mesh_utils reads of a TPU v4 chip (one device per chip)."""
  id: int
  coords: tuple[int, int, int]
  process_index: int
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


def tpu_slice(shape, slice_index=0, seed=0):
  """The chips of an x*y*z slice (a host per z plane), in a shuffled order."""
  chips = [FakeTpu(id=100 * slice_index + i, coords=(x, y, z), process_index=z,
                   slice_index=slice_index)
           for i, (z, y, x) in enumerate(itertools.product(*(range(n) for n in shape[::-1])))]
  random.Random(seed).shuffle(chips)
  return chips


def neighbours(a, b):
  return sum(abs(i - j) for i, j in zip(a.coords, b.coords)) == 1


def test_one_slice_puts_each_fsdp_group_on_neighbouring_chips():
  chips = tpu_slice((2, 2, 2))
  grid = sharding.device_grid(4, 2, chips)
  assert grid.shape == (4, 2) and sorted(d.id for d in grid.flat) == sorted(d.id for d in chips)
  assert all(neighbours(*row) for row in grid)
  # The same chips reshaped in the order given are not (the old plain reshape).
  assert not all(neighbours(*row) for row in np.asarray(chips).reshape(4, 2))
  # fsdp=4: each group is a 2x2 face of the cube (a ring), not 4 scattered chips.
  for row in sharding.device_grid(2, 4, chips):
    assert any(len({d.coords[axis] for d in row}) == 1 for axis in range(3))


def test_devices_without_a_torus_layout_keep_their_order():
  chips = tpu_slice((2, 2, 2))[:6]  # not a cuboid: mesh_utils finds a hole
  grid = sharding.device_grid(3, 2, chips)
  assert [d.id for d in grid.flat] == [d.id for d in chips]


def test_multislice_data_axis_spans_the_slices():
  chips = tpu_slice((2, 2, 1), 0, seed=1) + tpu_slice((2, 2, 1), 1, seed=2)
  random.Random(3).shuffle(chips)
  grid = sharding.device_grid(4, 2, chips)  # dcn_data=-1: both slices along 'data'
  assert [{d.slice_index for d in row} for row in grid] == [{0}, {0}, {1}, {1}]
  assert all(neighbours(*row) for row in grid)
  across = sharding.device_grid(4, 2, chips, dcn_data=1)  # the second slice extends 'fsdp'
  assert [{d.slice_index for d in column} for column in across.T] == [{0}, {1}]


@pytest.mark.parametrize("data,fsdp,dcn_data,match", [
    (4, 2, 3, r"mesh.dcn_data=3 must divide the 2 slices"),
    (1, 8, -1, r"data=1 x fsdp=8 cannot span 2 slices as 2 \(data\) x 1 \(fsdp\)"),
    (3, 2, -1, r"data=3 x fsdp=2 does not use the 8 devices"),
])
def test_multislice_mesh_errors(data, fsdp, dcn_data, match):
  chips = tpu_slice((2, 2, 1), 0) + tpu_slice((2, 2, 1), 1)
  with pytest.raises(ConfigError, match=match):
    sharding.device_grid(data, fsdp, chips, dcn_data=dcn_data)


def test_uneven_slices_and_dcn_data_on_one_slice_are_errors():
  with pytest.raises(ConfigError, match=r"slices hold different numbers of devices \(slice 0: 4, "
                                        r"slice 1: 8\)"):
    sharding.device_grid(-1, 1, tpu_slice((2, 2, 1), 0) + tpu_slice((2, 2, 2), 1))
  with pytest.raises(ConfigError, match="mesh.dcn_data=2 but the 8 devices form one slice"):
    sharding.device_grid(-1, 1, tpu_slice((2, 2, 2)), dcn_data=2)


def test_cpu_mesh_from_config_keeps_the_device_order():
  config = tiny_config()
  assert config.mesh.dcn_data == -1
  config.mesh.fsdp = 2
  mesh = sharding.mesh_from_config(config.mesh)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert (mesh.devices == np.asarray(jax.devices()).reshape(4, 2)).all()


# ----------------------------------------------------------------------------
# Start-up: MIM_JAX_* variables, Colab
# ----------------------------------------------------------------------------
def test_multi_process_variables():
  environ = {"MIM_JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "MIM_JAX_NUM_PROCESSES": "4",
             "MIM_JAX_PROCESS_ID": "3"}
  assert distributed.flags_from_environ(environ) == {
      "coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
  assert distributed.flags_from_environ({}) == {}
  with pytest.raises(ConfigError, match="set MIM_JAX_NUM_PROCESSES, MIM_JAX_PROCESS_ID too"):
    distributed.flags_from_environ({"MIM_JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(ConfigError, match=r"MIM_JAX_PROCESS_ID=4 must be in \[0, 4\)"):
    distributed.flags_from_environ({**environ, "MIM_JAX_PROCESS_ID": "4"})
  with pytest.raises(ConfigError, match="MIM_JAX_NUM_PROCESSES='four' must be a non-negative"):
    distributed.flags_from_environ({**environ, "MIM_JAX_NUM_PROCESSES": "four"})


def test_colab_is_one_process_whatever_tpu_metadata_it_shows(monkeypatch):
  tpu_pod = {"TPU_WORKER_HOSTNAMES": "w-0,w-1", "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}
  assert distributed.detect_cluster(tpu_pod) == "tpu"
  assert distributed.detect_cluster({**tpu_pod, "COLAB_RELEASE_TAG": "release-colab_20250101"}) \
      is None
  monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20250101")
  topology = distributed.initialize()
  assert (topology.process_count, topology.how) == (1, "single process, Colab")


# ----------------------------------------------------------------------------
# launch/tpu_pod.sh: dry runs and refusals (no gcloud needed)
# ----------------------------------------------------------------------------
SETTINGS = dict(PROJECT="my-project", ZONE="us-central2-b", TPU_NAME="mim",
                ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base")
# Settings of the caller's shell that would change what the scripts do.
SCRUBBED = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED",
            "SPOT", "SERVICE_ACCOUNT", "NODE_COUNT", "REPO_URL", "REPO_REF", "WORKER", "NODE", "DRY_RUN", "CONFIG",
            "WORKDIR", "SETUP", "PYTHON", "PYTHON_VERSION", "JAX_SPEC", "LOG_SYNC_S",
            "STOP_TIMEOUT_S", "START_CHECK_S", "POLL_S", "WAIT_TIMEOUT_S", "SLURM_JOB_ID",
            "SLURM_CPUS_PER_TASK", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_RESTART_COUNT")


def script(command, timeout=60, **env):
  full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
  return subprocess.run(command, env={**full_env, **env}, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def dry_run(*argv, **env):
  result = script(["bash", TPU_POD, *argv], DRY_RUN="1", **{**SETTINGS, **env})
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  where = "--project=my-project --zone=us-central2-b"
  assert (f"+ gcloud compute tpus tpu-vm create mim {where} --accelerator-type=v4-32 "
          f"--version=tpu-ubuntu2204-base") in dry_run("create")
  install = dry_run("install", REPO_REF="v1.0", PYTHON_VERSION="3.12")
  assert (f"+ gcloud compute tpus tpu-vm ssh mim {where} --worker=all '--command=bash -c "
          f"\"$(cat launch/tpu_worker.sh)\" tpu_worker.sh install "
          f"https://github.com/mim-jax/mim_jax 3.12 jax\\[tpu\\] v1.0'") in install
  run = dry_run("run", "configs/mae_vit_tiny.py", "gs://bucket/mae", "--config.seed=1")
  assert ("tpu_worker.sh run gs://bucket/mae 60 600 10 --config=configs/mae_vit_tiny.py "
          "--workdir=gs://bucket/mae --config.seed=1'") in run
  assert "copied every 60 s to gs://bucket/mae/logs/" in run
  assert "--worker=0 '--command=bash -c \"$(cat launch/tpu_worker.sh)\" tpu_worker.sh tail'" \
      in dry_run("tail")
  assert "tpu_worker.sh stop 900'" in dry_run("stop", STOP_TIMEOUT_S="900")
  assert f"+ gcloud compute tpus tpu-vm delete mim {where} --quiet" in dry_run("delete")
  queued = dry_run("create", QUEUED="1", SPOT="1", SERVICE_ACCOUNT="sa@p.iam.gserviceaccount.com")
  assert (f"+ gcloud compute tpus queued-resources create mim --node-id=mim {where} "
          f"--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot "
          f"--service-account=sa@p.iam.gserviceaccount.com "
          f"--scopes=https://www.googleapis.com/auth/cloud-platform") in queued
  assert "describe mim" in queued and "until ACTIVE" in queued


def test_tpu_pod_resume_recreates_installs_and_runs():
  out = dry_run("resume", "configs/d2mae_vit_tiny.py", "gs://bucket/d2", QUEUED="1")
  steps = [line.split(" mim ")[0] for line in out.splitlines() if line.startswith("+ gcloud")]
  assert steps == ["+ gcloud compute tpus queued-resources describe",
                   "+ gcloud compute tpus queued-resources delete",
                   "+ gcloud compute tpus queued-resources create",
                   "+ gcloud compute tpus queued-resources describe",
                   "+ gcloud compute tpus tpu-vm ssh", "+ gcloud compute tpus tpu-vm ssh"]
  assert "tpu_worker.sh install" in out and "tpu_worker.sh run gs://bucket/d2" in out


def test_tpu_pod_multislice():
  out = dry_run("create", "--node-count=2", QUEUED="1", ACCELERATOR_TYPE="v5p-32",
                RUNTIME_VERSION="v2-alpha-tpuv5")
  assert ("queued-resources create mim --node-count=2 --node-prefix=mim --project=my-project "
          "--zone=us-central2-b --accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5") in out
  run = dry_run("run", "configs/mae_vit_tiny.py", "gs://b/m", QUEUED="1", NODE_COUNT="2")
  assert ("+ gcloud compute tpus queued-resources ssh mim --project=my-project "
          "--zone=us-central2-b --node=all --worker=all") in run
  assert "--node=0 --worker=0" in dry_run("tail", QUEUED="1", NODE_COUNT="2")


def test_tpu_pod_help_names_the_runtime_versions():
  result = script(["bash", TPU_POD, "--help"])
  for name in ("v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "v2-alpha-tpuv6e", "tpu-ubuntu2204-base",
               "--node-count"):
    assert name in result.stdout


@pytest.mark.parametrize("argv,env,message", [
    (["create"], {}, "'create' needs PROJECT ZONE TPU_NAME"),
    (["create"], dict(PROJECT="p", ZONE="z", TPU_NAME="t"),
     "'create' needs ACCELERATOR_TYPE RUNTIME_VERSION"),
    (["resume", "c.py", "gs://b/r", "--project=p", "--zone=z", "--tpu-name=t"], {},
     "'resume' needs ACCELERATOR_TYPE RUNTIME_VERSION"),
    (["run", "configs/mae_vit_tiny.py", "runs/local"], dict(PROJECT="p", ZONE="z", TPU_NAME="t"),
     "the workdir must be gs://BUCKET/... "),
    (["run"], dict(PROJECT="p", ZONE="z", TPU_NAME="t"), "usage:"),
    (["create"], dict(SETTINGS, NODE_COUNT="2"), "multislice (NODE_COUNT=2) needs a queued "
     "resource: set QUEUED=1 too"),
    (["create", "--node-count=two"], SETTINGS, "NODE_COUNT=two must be a positive number"),
    (["launch"], {}, "unknown command 'launch'"),
])
def test_tpu_pod_refuses_missing_settings(argv, env, message):
  result = script(["bash", TPU_POD, *argv], DRY_RUN="1", **env)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert "+ gcloud" not in result.stdout


# ----------------------------------------------------------------------------
# launch/tpu_pod.sh against the fake gcloud: the real scripts, workers as local processes
# ----------------------------------------------------------------------------
def repo_snapshot(path):
  """A git repository holding this working tree (committed or not): what `install` clones."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True)
  if files.returncode != 0:
    pytest.skip("not a git checkout: the fake workers clone the repository")
  for name in filter(None, files.stdout.split("\0")):
    if os.path.isfile(os.path.join(REPO, name)):
      os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), os.path.join(path, name))
  git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
  for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
    subprocess.run(git + command, cwd=path, check=True, capture_output=True)
  return str(path)


@pytest.fixture(name="pod")
def pod_fixture(tmp_path):
  """Runs tpu_pod.sh commands against a fresh fake slice of 2 workers; kills leftovers."""
  root = tmp_path / "fake_tpu"
  env = dict(SETTINGS, ACCELERATOR_TYPE="v4-16", FAKE_GCLOUD_ROOT=str(root),
             PATH=os.pathsep.join([FAKE_GCLOUD, os.environ["PATH"]]), POLL_S="0.1",
             START_CHECK_S="1", LOG_SYNC_S="1", FAKE_GCLOUD_WORKERS="2",
             XLA_FLAGS="--xla_backend_optimization_level=0",
             # The resumed run's step comes from the first run's compilation.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def pod(*argv, timeout=300, **more):
    started = time.time()
    result = script(["bash", TPU_POD, *argv], timeout=timeout, **{**env, **more})
    print(f"tpu_pod.sh {argv[0]}: {time.time() - started:.1f} s")
    return result

  pod.root = root
  yield pod
  import psutil  # pylint: disable=import-outside-toplevel
  for proc in psutil.process_iter(["cmdline", "environ"]):
    try:
      if (proc.info["environ"] or {}).get("FAKE_GCLOUD_ROOT") == str(root):
        proc.kill()
    except psutil.Error:
      pass


def worker_home(pod, worker):
  return os.path.join(pod.root, "mim", "node_0", f"worker_{worker}")


def wait_for(predicate, what, timeout_s=300):
  deadline = time.time() + timeout_s
  while not predicate():
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.5)


def read(path):
  return open(path).read() if os.path.exists(path) else ""


def test_fake_slice_status_and_a_run_before_install(pod):
  assert pod("create").returncode == 0
  status = pod("status")
  assert status.returncode == 0, status.stderr
  assert "mim: READY" in status.stdout
  assert "fake-mim-w-0: no run" in status.stdout and "fake-mim-w-1: no run" in status.stdout
  calls = [json.loads(line) for line in open(pod.root / "calls.jsonl")]
  shipped = [arg for arg in calls[-1] if arg.startswith("--command=")][0]
  bash, flag, text, *args = shlex.split(shipped.removeprefix("--command="))
  assert [bash, flag, *args] == ["bash", "-c", "tpu_worker.sh", "status", "3"]
  assert text == open(os.path.join(LAUNCH, "tpu_worker.sh")).read().rstrip("\n")
  run = pod("run", "configs/mae_vit_tiny.py", "gs://bucket/run")
  assert run.returncode != 0
  assert "error: mim_jax is not installed here" in run.stderr + run.stdout


@pytest.mark.slow
def test_run_stop_preemption_resume_on_a_fake_slice(pod, tmp_path, demo_dir):
  workdir = str(tmp_path / "run")
  flags = [f"--config.{k}={v}" for k, v in dict(
      image_size=32, batch_size=16, warmup_steps=2, log_every=1, checkpoint_every=10_000,
      image_every=0, **{"model.variant": "", "model.patch_size": 8, "model.width": 32,
                        "model.depth": 2, "model.num_heads": 4, "mae.decoder.width": 16,
                        "mae.decoder.num_heads": 2, "data.worker_count": 0,
                        "data.data_dir": demo_dir}).items()]
  repo = repo_snapshot(tmp_path / "repo")
  for command in (["create"], ["install"]):
    result = pod(*command, REPO_URL=repo)
    assert result.returncode == 0, result.stdout + result.stderr
  assert "Python 3" in result.stdout and "uv pip install" in result.stdout

  run = pod("run", "configs/mae_vit_tiny.py:demo", workdir, "--config.total_steps=10000", *flags)
  assert run.returncode == 0, run.stdout + run.stderr
  log0 = os.path.join(worker_home(pod, 0), "mim_jax_run.log")
  wait_for(lambda: "step 1/10000" in read(log0), "the first step")
  assert "Distributed: 2 process(es) (MIM_JAX_* variables" in read(log0)

  stop = pod("stop")
  assert stop.returncode == 0, stop.stdout + stop.stderr
  assert "fake-mim-w-0: stopped" in stop.stdout and "fake-mim-w-1: stopped" in stop.stdout
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1, saved  # checkpoint_every is 10,000: only SIGTERM saved
  step = saved[0]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(os.path.join(workdir, "checkpoints", str(step), "data")))
  for worker in (0, 1):  # every worker's log, copied to the workdir after the exit
    copied = read(os.path.join(workdir, "logs", f"fake-mim-w-{worker}.log"))
    assert f"SIGTERM received: saved step {step}" in copied
    assert copied.endswith("the trainer exited with status 0\n")

  # A Spot preemption: the VMs (and everything on their disks) are gone.
  state = json.load(open(pod.root / "state.json"))
  state["mim"]["state"] = "PREEMPTED"
  json.dump(state, open(pod.root / "state.json", "w"))
  resume = pod("resume", "configs/mae_vit_tiny.py:demo", workdir, "--config.total_steps=10000",
               *flags, REPO_URL=repo)
  assert resume.returncode == 0, resume.stdout + resume.stderr
  assert "mim: PREEMPTED" in resume.stdout
  verbs = [call[2:4] for call in map(json.loads, open(pod.root / "calls.jsonl"))]
  assert verbs[-7:] == [["tpu-vm", "describe"], ["tpu-vm", "delete"], ["tpu-vm", "create"],
                        ["tpu-vm", "describe"], ["tpu-vm", "describe"], ["tpu-vm", "ssh"],
                        ["tpu-vm", "ssh"]]
  # The new VM's log starts from the copy in the workdir.
  wait_for(lambda: f"step {step + 1}/10000" in read(log0), "a step of the resumed run")
  assert pod("stop").returncode == 0
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved[0] == step and saved[-1] > step, saved
  log = read(os.path.join(workdir, "logs", "fake-mim-w-0.log"))
  assert log.count("the trainer exited with status 0") == 2, log[-3000:]
  # One log across both VMs: the first run, then the resumed one, each saving on SIGTERM.
  first_save = log.index(f"SIGTERM received: saved step {step}")
  assert first_save < log.index(f"Resumed from step {step}") < log.index(
      f"SIGTERM received: saved step {saved[-1]}")
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == list(range(1, saved[-1] + 1))  # log_every=1: no step lost or repeated
  assert pod("delete").returncode == 0


@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  from mim_jax.data.sources import build_demo_dataset  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("demo_tfds"))
  build_demo_dataset(path)  # once, before the workers would race to build it
  return path


# ----------------------------------------------------------------------------
# launch/gpu_slurm.sbatch: the srun command line (a fake srun records it)
# ----------------------------------------------------------------------------
def test_slurm_passes_cpus_per_task_and_runs_the_setup(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "srun.json"
  (bin_dir / "srun").write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      f"json.dump({{'argv': sys.argv[1:], 'setup': os.environ.get('FROM_SETUP')}}, "
      f"open({str(record)!r}, 'w'))\n")
  (bin_dir / "srun").chmod(0o755)
  result = script(["bash", SLURM, "--config.seed=1"], CONFIG="configs/mae_vit_tiny.py",
                  WORKDIR="/shared/mae", SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="6",
                  SLURM_NNODES="2", SLURM_NTASKS="16", SETUP="export FROM_SETUP=yes",
                  PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]))
  assert result.returncode == 0, result.stderr
  assert json.load(open(record)) == {"argv": [
      "--kill-on-bad-exit=1", "--cpus-per-task=6", "python3", "-m", "mim_jax.train",
      "--config=configs/mae_vit_tiny.py", "--workdir=/shared/mae", "--config.seed=1"],
      "setup": "yes"}
  assert "job 42 (restart 0): 2 node(s), 16 task(s), 6 CPUs per task" in result.stdout
  header = open(SLURM).read()
  for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=TERM@120"):
    assert line in header


def test_slurm_dry_run_and_refusals():
  result = script(["bash", SLURM, "--config.seed=1"], DRY_RUN="1",
                  CONFIG="configs/mae_vit_tiny.py", WORKDIR="/shared/mae")
  assert result.returncode == 0, result.stderr
  assert ("+ srun --kill-on-bad-exit=1 --cpus-per-task=8 python3 -m mim_jax.train "
          "--config=configs/mae_vit_tiny.py --workdir=/shared/mae --config.seed=1") in result.stdout
  missing = script(["bash", SLURM], DRY_RUN="1", WORKDIR="/shared/mae")
  assert missing.returncode == 2 and "error: set CONFIG" in missing.stderr
  outside = script(["bash", SLURM], CONFIG="c.py", WORKDIR="/shared/mae")
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


# ----------------------------------------------------------------------------
# One repository URL everywhere
# ----------------------------------------------------------------------------
def canonical_url():
  return re.search(r'url="([^"]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)


# github.com/OWNER/REPO and Colab's colab.research.google.com/github/OWNER/REPO.
GITHUB_REPO = re.compile(
    r"(?:github\.com|colab\.research\.google\.com/github)/([^/\s\"'()\]\\]+)/"
    r"([^/\s\"'()\]#?\\`]+)")  # a backslash (JSON-escaped quotes) or backtick ends a name


def project_urls(text):
  """(owner/repo) of every GitHub URL naming this project, or a placeholder for it."""
  found = []
  for owner, repo in GITHUB_REPO.findall(text):
    name = repo.rstrip(".,;:").removesuffix(".git")
    if re.fullmatch(r"mim[-_]jax", name, re.IGNORECASE) or "<" in owner + repo:
      found.append(f"{owner}/{name}")
  return found


def test_one_repository_url_everywhere():
  canonical = canonical_url().removeprefix("https://github.com/")
  assert re.fullmatch(r"[\w.-]+/mim_jax", canonical)
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True).stdout.split()
  if not files:  # not a git checkout
    files = [os.path.relpath(os.path.join(d, f), REPO) for d, _, names in os.walk(REPO)
             if ".git" not in d for f in names]
  wrong, users = [], []
  for name in files:
    try:
      text = open(os.path.join(REPO, name), encoding="utf-8").read()
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
      continue
    for number, line in enumerate(text.splitlines(), 1):
      for url in project_urls(line):
        (users if url == canonical else wrong).append(f"{name}:{number}: {url}")
  assert not wrong, "use " + canonical_url() + " (setup.py's url):\n" + "\n".join(wrong)
  for name in ("launch/tpu_pod.sh", "colab/01_quickstart.ipynb", "docs/tpu_pod.md"):
    assert any(user.startswith(name + ":") for user in users), name
