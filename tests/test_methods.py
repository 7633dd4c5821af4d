"""Every pre-training method through the trainer: a sharded step equals the single-device
step, and a run resumed from a checkpoint equals the uninterrupted run (SimMIM, MaskFeat;
MAE and D²-MAE have their own in test_sharding.py and test_train.py)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import shipped_config
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop, sharding

METHODS = ("simmim", "maskfeat")


def method_config(method, data_dir=None):
  """configs/<method>_vit_tiny.py:demo with a 2-block, 32-wide ViT on 32-px images."""
  config = shipped_config(f"{method}_vit_tiny.py", "demo")
  config.image_size = 32
  config.model.update(variant="", width=32, depth=2, num_heads=4, patch_size=8)
  if method == "simmim":
    config.simmim.mask_patch_size = 16
  config.update(batch_size=16, total_steps=4, warmup_steps=1, log_every=1, checkpoint_every=2,
                keep_checkpoints=3, image_every=0)
  config.data.update(worker_count=0, data_dir=data_dir)
  config.mesh.fsdp_min_size = 64  # shard even this tiny model's kernels
  return config


def batch_for(task, mesh, seed=0):
  """A global batch with what the task's data spec asks for (worker fields made here)."""
  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)}
  for field in task.data_spec.worker_fields:
    batch[field.name] = np.stack([field.make(np.random.default_rng(seed + i))
                                  for i in range(16)])
  return sharding.global_batch(batch, mesh)


def one_step(task, config, devices, fsdp):
  mesh = sharding.make_mesh(-1, fsdp, devices=devices)
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, params, 10, 0, task.weight_decay_mask(params))
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  state = init_state()
  initial = jax.device_get(state["params"])
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  new_state, metrics = step(state, frozen, batch_for(task, mesh))
  return initial, jax.device_get(new_state), jax.device_get(metrics), new_state


@pytest.mark.parametrize("method", METHODS)
def test_sharded_step_equals_single_device_step(method):
  config = method_config(method)
  task = build_task(config)
  initial, one, one_metrics, _ = one_step(task, config, jax.devices()[:1], fsdp=1)
  _, many, many_metrics, sharded = one_step(task, config, jax.devices(), fsdp=2)
  qkv = sharded["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  for name in one_metrics:
    np.testing.assert_allclose(many_metrics[name], one_metrics[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               one["params"], many["params"])
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), initial["head"],
                       one["params"]["head"])
  assert all(jax.tree.leaves(moved)), moved  # the step really trained the head


def metric_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(method, tmp_path):
  data_dir = str(tmp_path / "tfds")
  config = method_config(method, data_dir)
  whole = str(tmp_path / "whole")
  loop.train(config, whole, build_task(config))
  # The same run stopped after step 2: its checkpoint at step 2, its metrics up to it.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("4", "tensorboard"))
  records = metric_records(whole)
  with open(os.path.join(resumed, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(records[step]) + "\n" for step in (1, 2))
  loop.train(config, resumed, build_task(config))
  again = metric_records(resumed)
  for step in (3, 4):
    term = "loss_rec" if method == "simmim" else "loss_hog"
    np.testing.assert_allclose(again[step][term], records[step][term], rtol=1e-6,
                               err_msg=f"step {step}")
