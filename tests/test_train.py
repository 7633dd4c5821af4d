"""The train CLI end to end: resume after kill -9 and SIGTERM, bad input, divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_cli_flags
from mim_jax.errors import CheckpointMismatchError, ConfigError, TrainingDivergedError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mae_vit_tiny.py")


def train_command(workdir, demo_dir, **overrides):
  return [sys.executable, "-m", "mim_jax.train", f"--config={CONFIG}:demo",
          f"--workdir={workdir}"] + tiny_cli_flags(demo_dir, **overrides)


def subprocess_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # compiles faster than 8
  return env


def read_losses(workdir):
  """{step: loss}, the last record of each step winning (a resumed run re-logs steps)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      losses[record["step"]] = record["loss"]
  return losses


def wait_for_logged_steps(proc, workdir, count, timeout=240):
  """Returns once the running `proc` has logged `count` steps (or ended, or timed out)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= count:
      return
    time.sleep(0.05)


@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tfds"))


@pytest.fixture(scope="module", name="uninterrupted")
def uninterrupted_fixture(tmp_path_factory, demo_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  subprocess.run(train_command(workdir, demo_dir), check=True, env=subprocess_env(),
                 capture_output=True)
  return read_losses(workdir)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, demo_dir, uninterrupted):
  assert sorted(uninterrupted) == list(range(1, 9))
  workdir = str(tmp_path)
  # A figure at every step (it reads the state, never changes it) keeps the run going long
  # enough to be stopped in the middle however fast the machine is.
  proc = subprocess.Popen(train_command(workdir, demo_dir, image_every=1), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_logged_steps(proc, workdir, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(read_losses(workdir))
  assert killed_at < 8, "the run finished before it could be killed"
  # What a kill -9 in the middle of a save leaves behind: an unfinished temporary step.
  os.makedirs(os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp", "state"))
  subprocess.run(train_command(workdir, demo_dir, image_every=1), check=True,
                 env=subprocess_env(), capture_output=True)
  resumed = read_losses(workdir)
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, demo_dir, uninterrupted):
  workdir = str(tmp_path)
  proc = subprocess.Popen(train_command(workdir, demo_dir, checkpoint_every=100, image_every=1),
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  wait_for_logged_steps(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, output
  assert "SIGTERM received: saved step" in output
  stopped_at = max(read_losses(workdir))
  assert stopped_at < 8
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))
  subprocess.run(train_command(workdir, demo_dir, checkpoint_every=100, image_every=1), check=True,
                 env=subprocess_env(), capture_output=True)
  resumed = read_losses(workdir)
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


def run_cli(args, env=None):
  return subprocess.run([sys.executable, "-m", "mim_jax.train"] + args, capture_output=True,
                        text=True, env=env or subprocess_env(), timeout=300)


@pytest.mark.parametrize("override, message", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.image_size=30", "image_size=30 is not divisible by model.patch_size=8"),
    ("--config.mask_ratio=1.0", "mask_ratio=1.0 must be in (0, 1)"),
])
def test_cli_bad_config_is_one_line_error(tmp_path, override, message):
  workdir = tmp_path / "wd"
  result = run_cli([f"--config={CONFIG}:demo", f"--workdir={workdir}", override])
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_cli_missing_dataset_says_how_to_prepare(tmp_path):
  result = run_cli([f"--config={CONFIG}", f"--workdir={tmp_path / 'wd'}",
                    f"--config.data.data_dir={tmp_path / 'nothing'}"])
  assert result.returncode == 2
  assert "imagenet2012" in result.stderr and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()[-1]) > 20


def test_batch_not_divisible_by_devices(tiny_config, tmp_path, demo_dir):
  tiny_config.batch_size = 12  # 8 fake devices
  tiny_config.data.data_dir = demo_dir
  with pytest.raises(ConfigError, match="batch_size 12 is not divisible by the 8 devices"):
    loop.train(tiny_config, str(tmp_path), build_task(tiny_config))
  assert not os.listdir(tmp_path)


def test_checkpoint_of_another_model_is_refused_and_kept(tiny_config, tmp_path, demo_dir):
  tiny_config.data.data_dir = demo_dir
  tiny_config.total_steps = 1
  loop.train(tiny_config, str(tmp_path), build_task(tiny_config))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  tiny_config.model.width = 48
  tiny_config.model.num_heads = 4
  with pytest.raises(CheckpointMismatchError, match=r"encoder/blocks_0/attn/qkv/kernel: "
                     r"checkpoint \(32, 96\) vs model \(48, 144\)"):
    loop.train(tiny_config, str(tmp_path), build_task(tiny_config))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, demo_dir):
  tiny_config.data.data_dir = demo_dir
  tiny_config.checkpoint_every = 2
  # Step 1 has lr 0 (warm-up starts at 0); step 2's update (lr ~1e28) makes the
  # attention logits overflow, so step 3's loss is NaN.
  tiny_config.optimizer.base_lr = 1e30
  with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3; .*"
                     r"last good checkpoint is step 2") as info:
    loop.train(tiny_config, str(tmp_path), build_task(tiny_config))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved == [2], info.value
