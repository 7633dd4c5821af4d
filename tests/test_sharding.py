"""Placement rules, and one sharded train step equal to the same step on one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_teacher, tiny_distill_config
from mim_jax.errors import ConfigError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop, sharding


def test_leaf_spec_rules():
  assert sharding.leaf_spec("encoder/blocks_0/attn/qkv/kernel", (192, 576), 4) == P(None, "fsdp")
  assert sharding.leaf_spec("encoder/blocks_0/mlp/fc2/kernel", (768, 192), 4) == P("fsdp", None)
  assert sharding.leaf_spec("encoder/blocks_0/attn/qkv/bias", (576,), 4) == P()
  assert sharding.leaf_spec("encoder/cls_token", (1, 1, 192), 4) == P()
  assert sharding.leaf_spec("tiny/kernel", (8, 8), 4) == P()  # below fsdp_min_size
  assert sharding.leaf_spec("x/kernel", (192, 576), 1) == P()  # no fsdp axis
  assert sharding.leaf_spec("odd/kernel", (191, 577), 4) == P()  # nothing divisible


def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh(8, 1).shape) == {"data": 8, "fsdp": 1}
  with pytest.raises(ConfigError, match="does not use the 8 devices"):
    sharding.make_mesh(3, 2)
  with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
    sharding.check_batch_size(12, sharding.make_mesh(-1, 1))


def run_one_step(task, config, devices, fsdp):
  """One step of the trainer's own state init and jitted step on a mesh over `devices`."""
  mesh = sharding.make_mesh(-1, fsdp, devices=devices)
  config.mesh.fsdp_min_size = 64  # shard even this tiny model's kernels
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, params, 10, 0)  # no warm-up: lr > 0 at once
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  state = init_state()
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  initial = jax.device_get(state["params"])
  images = np.random.RandomState(0).randint(0, 256, (16, 32, 32, 3)).astype(np.uint8)
  batch = sharding.global_batch({"image": images}, mesh)
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  new_state, metrics = step(state, frozen, batch)
  return initial, jax.device_get(new_state), jax.device_get(metrics), new_state


@pytest.mark.parametrize("method", ["mae", "d2mae"])
def test_sharded_step_equals_single_device_step(tiny_config, tmp_path, method):
  assert jax.device_count() == 8
  if method == "d2mae":
    tiny_config = tiny_distill_config(make_teacher(tmp_path / "teacher.npz"))
  task = build_task(tiny_config)
  initial, one_state, one_metrics, _ = run_one_step(task, tiny_config, jax.devices()[:1],
                                                    fsdp=1)
  _, many_state, many_metrics, sharded = run_one_step(task, tiny_config, jax.devices(), fsdp=2)
  # The FSDP rule really sharded something over the 4 x 2 mesh.
  qkv = sharded["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P(None, "fsdp")
  for name in one_metrics:  # every loss term, distillation included
    np.testing.assert_allclose(many_metrics[name], one_metrics[name], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               one_state["params"], many_state["params"])
  # And the step did move the parameters.
  assert not np.allclose(initial["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                         one_state["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
