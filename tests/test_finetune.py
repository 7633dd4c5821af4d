"""Fine-tuning end to end on a real labelled set (scikit-learn's digits), initialisation
from a pre-training run, and bad input."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax import config_defaults
from mim_jax.convert import load_converted
from mim_jax.data.sources import DataError
from mim_jax.errors import ConfigError
from mim_jax.tasks.base import normalize_images
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop
from mim_jax.trainer.tree import flatten_with_names


@pytest.fixture(scope="module", name="data_dir")
def data_dir_fixture(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def digits_config(data_dir, **model):
  config = config_defaults.finetune_demo_overrides(config_defaults.finetune_config())
  config.model.update(variant="", width=32, depth=2, num_heads=4, **model)
  config.data.data_dir = data_dir
  config.data.worker_count = 0
  config.total_steps, config.warmup_steps, config.eval_every = 100, 10, 100
  config.mixup.mixup_alpha = 0.0
  config.data.randaug_magnitude = None  # 100 steps on 1442 digits: learn the plain task
  config.optimizer.base_lr = 0.016
  config.checkpoint_every = 100
  return config


@pytest.mark.slow
def test_short_finetune_beats_chance_and_eval_matches_numpy(tmp_path, data_dir):
  config = digits_config(data_dir)
  workdir = str(tmp_path / "ft")
  result = loop.train(config, workdir, build_task(config))
  assert result["val_top1"] > 40.0, result  # 10 classes: chance is 10%
  # The same top-1 from the checkpoint, computed here with numpy on the model's logits.
  trained = load_converted(workdir)
  task = build_task(config)
  from mim_jax.data import pipeline
  loader = pipeline.make_eval_loader(config.data, global_batch_size=64, image_size=32,
                                     worker_count=0, with_labels=True)
  hits, count = 0, 0
  for batch in loader:
    logits = np.asarray(jax.jit(task.model.apply)({"params": trained.params["encoder"]},
                                                  normalize_images(batch["image"]))["logits"])
    keep = batch["mask"]
    hits += int(np.sum(np.argmax(logits, axis=1)[keep] == batch["label"][keep]))
    count += int(keep.sum())
  assert count == 355
  np.testing.assert_allclose(result["val_top1"], 100.0 * hits / count, rtol=1e-6)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("val_top5" in r for r in records)


def test_finetune_from_a_pretraining_run_loads_every_encoder_leaf(tmp_path, data_dir,
                                                                 demo_data_dir):
  pre = tiny_config()
  pre.total_steps = 1
  pre.data.data_dir = demo_data_dir
  pre_dir = str(tmp_path / "pre")
  loop.train(pre, pre_dir, build_task(pre))
  config = digits_config(data_dir)
  config.init = pre_dir
  task = build_task(config)
  fresh = jax.device_get(task.init_params(jax.random.PRNGKey(0)))
  params = flatten_with_names(task.merge_pretrained(fresh))
  source = flatten_with_names(load_converted(pre_dir).params["encoder"])
  fresh = flatten_with_names(fresh)
  for name, value in params.items():
    if name.startswith(("head/", "fc_norm/")):
      np.testing.assert_array_equal(value, fresh[name])
    elif name != "pos_embed":
      np.testing.assert_array_equal(value, source[name], err_msg=name)
  assert set(source) - set(params) == {"norm/bias", "norm/scale"}


def test_bad_finetune_configs(tmp_path, data_dir):
  config = digits_config(data_dir)
  config.num_classes = 7
  config.total_steps = 1
  with pytest.raises(ConfigError, match="num_classes=7 but the data set .* has 10 classes"):
    loop.train(config, str(tmp_path / "a"), build_task(config))
  config = digits_config(data_dir)
  config.data.eval_split = "no_such_split"
  with pytest.raises(DataError, match="allow_no_eval"):
    loop.train(config, str(tmp_path / "b"), build_task(config))
  config.init = str(tmp_path / "missing")
  with pytest.raises(Exception, match="no such file"):
    build_task(config)
  config.init = ""
  config.init_keep_blocks = 1
  with pytest.raises(ConfigError, match="init_keep_blocks needs init"):
    build_task(config)
