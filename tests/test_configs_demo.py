"""Every config file builds; its demo variant trains a step; the demo job runs end to end."""

import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags

from conftest import make_teacher
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


# Configs whose argument is required: the full recipe to build.
FULL_ARGS = {"transfer_vit_tiny.py": "flowers,lr=0.01,schedule=long,layer_decay=0.75"}


def load(path, arg=None):
  module = config_flags.config_flags._LoadConfigModule("cfg", path)  # how --config loads it
  return module.get_config(arg) if arg else module.get_config()


def test_there_are_configs():
  assert any(p.endswith("mae_vit_tiny.py") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_builds_and_demo_runs_one_step(path, tmp_path, demo_data_dir):
  full = load(path, FULL_ARGS.get(os.path.basename(path)))
  distilled = full.task in ("dmae", "d2mae")
  # Validates the full recipe and builds its model (a teacher file is the user's to give).
  task = build_task(full, random_teacher=True) if distilled else build_task(full)
  assert task.num_patches == (full.image_size // full.model.patch_size) ** 2
  demo = load(path, "demo")
  demo.lock()
  demo.total_steps = 1
  demo.data.worker_count = 0
  demo.data.data_dir = demo_data_dir
  if distilled:  # a 12-block teacher of the demo's patch size, small to keep this fast
    demo.distill.teacher = make_teacher(tmp_path / "teacher.npz", width=32, depth=12,
                                        num_heads=4, patch_size=demo.model.patch_size,
                                        image_size=demo.image_size)
  task = build_task(demo)
  demo.image_every = 1 if task.figure_columns else 0
  result = loop.train(demo, str(tmp_path / "wd"), task)
  assert result["loss"] > 0
  if task.figure_columns:  # MAE, SimMIM: a reconstruction figure
    assert os.listdir(tmp_path / "wd" / "reconstructions")
  if task.evaluates:  # fine-tuning, probing: evaluated at the end
    assert 0 <= result["val_top1"] <= 100
  assert os.path.isdir(tmp_path / "wd" / "checkpoints" / "1")


@pytest.mark.slow
def test_demo_job_end_to_end(tmp_path, demo_data_dir):
  workdir = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.demo", f"--workdir={workdir}",
       f"--config.data.data_dir={demo_data_dir}", "--config.total_steps=30",
       "--config.log_every=10", "--config.image_every=30", "--config.model.depth=4",
       "--student_width=48", "--student_heads=6", "--finetune_steps=10",
       "--probe_steps=10"],
      capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mim_jax demo finished" in result.stdout
  for stage in ("teacher", "d2mae_student", "mae_student", "simmim_student", "maskfeat_student"):
    records = [json.loads(line) for line in open(workdir / stage / "metrics.jsonl")]
    assert [r["step"] for r in records] == [10, 20, 30], stage
    term = "loss_hog" if stage == "maskfeat_student" else "loss_rec"
    assert all({"step", "loss", term, "lr", "images_per_sec"} <= set(r) for r in records)
    assert records[-1]["loss"] < records[0]["loss"], stage  # each learns in 30 steps
    figure = workdir / stage / "reconstructions" / "step_00000030.png"
    assert os.path.exists(figure) == (stage != "maskfeat_student"), stage  # HOG: no figure
    assert glob.glob(str(workdir / stage / "tensorboard" / "events.out.tfevents.*"))
    assert ("loss_attn" in records[-1]) == (stage == "d2mae_student")
    assert stage in result.stdout
  # The evaluation: probes and a short fine-tune of each student and of a random init.
  table = result.stdout.split("digits top-1")[1].splitlines()
  for name in ("d2mae_student", "mae_student", "simmim_student", "maskfeat_student", "scratch"):
    row = next(line for line in table if line.startswith(name + " "))
    knn, ridge, linear, finetune = (float(v) for v in row.split()[1:5])
    assert all(0 <= v <= 100 for v in (knn, ridge, linear, finetune)), row
    for run, value in (("linear_probe", linear), ("finetune", finetune)):
      records = [json.loads(line) for line in open(workdir / f"{run}_{name}" / "metrics.jsonl")]
      assert records[-1]["val_top1"] == pytest.approx(value, abs=0.05), run
  # The D²-MAE student really is the teacher's pupil: its checkpoint records the teacher.
  meta = json.load(open(workdir / "d2mae_student" / "checkpoints" / "30" / "meta" / "metadata"))
  assert meta["frozen"]["teacher"]["path"] == str(workdir / "teacher")


def test_transfer_sweep_arguments_follow_table_s2():
  path = os.path.join(REPO, "configs", "transfer_vit_tiny.py")
  config = load(path, "cifar100,lr=0.3,schedule=long,layer_decay=0.75")
  assert (config.num_classes, config.total_epochs, config.warmup_epochs) == (100, 50.0, 10.0)
  assert config.optimizer.name == "sgd" and config.optimizer.weight_decay == 0.0
  assert config.optimizer.base_lr * config.batch_size / 256 == pytest.approx(0.3)
  assert config.optimizer.layer_decay == 0.75 and config.batch_size == 512
  short = load(path, "flowers")
  assert (short.num_classes, short.total_epochs, short.warmup_epochs) == (102, 150.0, 30.0)
  assert short.data.name == "oxford_flowers102" and short.optimizer.layer_decay == 1.0
  with pytest.raises(ValueError, match="unknown data set"):
    load(path, "mnist")
  with pytest.raises(ValueError, match="bad option"):
    load(path, "pets,momentum=0.5")
