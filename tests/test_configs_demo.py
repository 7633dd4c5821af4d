"""Every config file builds; its demo variant trains a step; the demo job runs end to end."""

import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags

from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path, arg=None):
  module = config_flags.config_flags._LoadConfigModule("cfg", path)  # how --config loads it
  return module.get_config(arg) if arg else module.get_config()


def test_there_are_configs():
  assert any(p.endswith("mae_vit_tiny.py") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_builds_and_demo_runs_one_step(path, tmp_path):
  full = load(path)
  task = build_task(full)  # validates the full recipe and builds its model
  assert task.num_patches == (full.image_size // full.model.patch_size) ** 2
  demo = load(path, "demo")
  demo.lock()
  demo.total_steps = 1
  demo.image_every = 1
  demo.data.worker_count = 0
  demo.data.data_dir = str(tmp_path / "demo_tfds")
  result = loop.train(demo, str(tmp_path / "wd"), build_task(demo))
  assert result["loss"] > 0
  assert os.listdir(tmp_path / "wd" / "reconstructions")
  assert os.path.isdir(tmp_path / "wd" / "checkpoints" / "1")


@pytest.mark.slow
def test_demo_job_end_to_end(tmp_path):
  workdir = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.demo", f"--workdir={workdir}",
       f"--config.data.data_dir={tmp_path / 'demo_tfds'}", "--config.total_steps=30",
       "--config.log_every=10", "--config.image_every=30", "--config.model.depth=4"],
      capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "MAE demo finished" in result.stdout
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert all({"step", "loss", "lr", "images_per_sec"} <= set(r) for r in records)
  assert records[-1]["loss"] < records[0]["loss"]  # it learns something in 30 steps
  assert os.path.exists(workdir / "reconstructions" / "step_00000030.png")
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
