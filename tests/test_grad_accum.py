"""Gradient accumulation (trainer/accumulate.py): 4 micro-batches of 16 are one step of 64.

The reference of an accumulated step is the unaccumulated step on the whole batch
(the losses themselves are checked against PyTorch / float64 elsewhere); the
linear probe, whose BatchNorm sees each micro-batch, is checked against numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_teacher, tiny_config, tiny_distill_config
from mim_jax import config_defaults
from mim_jax.errors import ConfigError
from mim_jax.tasks import linear_probe
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import accumulate, loop, sharding

BATCH, STEPS = 64, 4


def images(config, seed=0):
  return np.random.RandomState(seed).randint(
      0, 256, (BATCH, config.image_size, config.image_size, 3)).astype(np.uint8)


def assert_trees_close(actual, expected, rtol=1e-5):
  """Leaf by leaf: max |a - e| <= rtol * max |e| (float32 sums in another order)."""
  flat_a, flat_e = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for a, e in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape
    np.testing.assert_array_less(np.max(np.abs(a - e), initial=0.0),
                                 rtol * np.max(np.abs(e), initial=0.0) + 1e-12)


def test_micro_batch_keys_draw_the_rows_of_the_full_batch():
  rng = jax.random.fold_in(jax.random.PRNGKey(3), 7)
  full_noise = jax.random.uniform(rng, (8, 5))
  child = jax.random.fold_in(jax.random.split(rng)[1], 11)
  full_child = jax.random.bernoulli(child, 0.5, (8, 1, 1))

  @jax.jit
  def micro(index):
    key = accumulate.micro_batch_key(rng, index, steps=4, micro_size=2)
    grandchild = jax.random.fold_in(jax.random.split(key)[1], 11)  # derivations commute
    return (jax.random.uniform(key, (2, 5)), jax.random.bernoulli(grandchild, 0.5, (2, 1, 1)),
            jax.random.uniform(key, ()), jax.random.uniform(key, (3,)))

  for index in range(4):
    noise, drop, scalar, other = micro(jnp.uint32(index))
    np.testing.assert_array_equal(noise, full_noise[index::4])  # split_batch's striding
    np.testing.assert_array_equal(drop, full_child[index::4])
    np.testing.assert_array_equal(scalar, jax.random.uniform(rng, ()))  # not per example:
    np.testing.assert_array_equal(other, jax.random.uniform(rng, (3,)))  # the batch's draw


@pytest.mark.parametrize("method", ["mae", "d2mae"])
def test_four_micro_batches_of_16_are_one_step_of_64(tmp_path, method):
  """The acceptance test: loss, terms and the state after one accumulated, sharded step
  equal one unaccumulated step of 64, to float rounding. The first step's lr is 0 (warm-up),
  so the gradients show in AdamW's moments (linear and quadratic in them), not through
  the sign-like first update."""
  config = (tiny_config() if method == "mae" else
            tiny_distill_config(make_teacher(tmp_path / "teacher.npz")))
  config.batch_size = BATCH
  task = build_task(config)
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract, total_steps=10, warmup_steps=2)
  mesh = sharding.make_mesh()
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  batch = {"image": images(config)}
  state = init_state()

  whole = jax.jit(loop.make_train_step(task, tx, schedule))
  expected_state, expected_metrics = jax.device_get(whole(state, frozen, batch))

  config.grad_accum_steps = STEPS
  accumulated = loop.jit_train_step(build_task(config), tx, schedule, shardings,
                                    frozen_shardings, mesh)
  new_state, metrics = jax.device_get(
      accumulated(state, frozen, sharding.global_batch(batch, mesh)))
  assert set(metrics) == set(expected_metrics)
  assert_trees_close(metrics, expected_metrics)
  assert_trees_close(new_state, expected_state)
  moments = [np.abs(x).max() for x in jax.tree.leaves(new_state["opt_state"])
             if np.issubdtype(x.dtype, np.floating)]
  assert min(moments) > 0  # every gradient leaf reached the optimizer


def test_fine_tuning_stochastic_depth_is_the_full_batch_s():
  """Per-example randomness inside the model (stochastic depth through flax's 'dropout'
  rng) is the unaccumulated step's: the gradients agree."""
  config = config_defaults.finetune_demo_overrides(config_defaults.finetune_config())
  config.model.update(variant="", width=32, depth=2, num_heads=4, drop_path_rate=0.5)
  config.mixup.prob = 0.0  # mixing partners are per micro-batch (module docstring)
  task = build_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  batch = {"image": images(config),
           "label": np.random.RandomState(1).randint(0, 10, BATCH).astype(np.int32)}
  rng = jax.random.PRNGKey(4)
  whole = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
  expected = whole(params, {}, {}, batch, rng)
  actual = jax.jit(accumulate.value_and_grad(task.loss_fn, STEPS))(params, {}, {}, batch, rng)
  assert_trees_close(actual, expected)
  other_drops = whole(params, {}, {}, batch, jax.random.PRNGKey(5))
  assert not np.isclose(float(other_drops[0][0]), float(expected[0][0]))  # the rng matters


def probe_reference(features, labels, kernel, bias, running, num_classes, steps=STEPS):
  """MAE's head with accumulation, float64 numpy: each strided micro-batch normalised by its
  own statistics; loss and head gradients averaged; running statistics moved once by the
  micro-batches' mean statistics."""
  losses, grads_k, grads_b, means, variances = [], [], [], [], []
  for i in range(steps):
    x, y = features[i::steps], labels[i::steps]
    mean, var = x.mean(0), x.var(0)
    z = (x - mean) / np.sqrt(var + linear_probe.BATCHNORM_EPS)
    logits = z @ kernel + bias
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(num_classes)[y]
    losses.append(-np.mean(np.sum(onehot * np.log(probs), -1)))
    grads_k.append(z.T @ (probs - onehot) / len(x))
    grads_b.append((probs - onehot).mean(0))
    means.append(mean)
    variances.append(var * len(x) / (len(x) - 1))
  momentum = linear_probe.BATCHNORM_MOMENTUM
  stats = {"mean": (1 - momentum) * running["mean"] + momentum * np.mean(means, 0),
           "var": (1 - momentum) * running["var"] + momentum * np.mean(variances, 0)}
  return np.mean(losses), {"kernel": np.mean(grads_k, 0), "bias": np.mean(grads_b, 0)}, stats


def test_linear_probe_batchnorm_sees_each_micro_batch():
  config = config_defaults.linear_probe_demo_overrides(config_defaults.linear_probe_config())
  config.model.update(variant="", width=32, depth=2, num_heads=4)
  task = build_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  params["head"]["bias"] = jnp.linspace(-1.0, 1.0, config.num_classes)
  extra = {"model_state": {"mean": jnp.full((32,), 0.3), "var": jnp.full((32,), 2.0)}}
  frozen, _ = task.load_frozen()
  labels = np.random.RandomState(1).randint(0, 10, BATCH).astype(np.int32)
  batch = {"image": images(config), "label": labels}
  (loss, aux), grads = jax.jit(accumulate.value_and_grad(task.loss_fn, STEPS))(
      params, extra, frozen, batch, jax.random.PRNGKey(0))

  features = np.asarray(jax.jit(task.features)(frozen["encoder"], batch["image"]), np.float64)
  host = jax.tree.map(lambda x: np.asarray(x, np.float64), (params, extra))
  expected_loss, expected_grads, expected_stats = probe_reference(
      features, labels, host[0]["head"]["kernel"], host[0]["head"]["bias"],
      host[1]["model_state"], config.num_classes)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(aux.terms["loss_ce"], expected_loss, rtol=1e-5)
  assert_trees_close(grads["head"], expected_grads, rtol=1e-4)
  assert_trees_close(aux.updates, expected_stats)
  # The statistics of the whole batch would give another loss: the micro-batches matter.
  whole_loss, _, _ = probe_reference(features, labels, host[0]["head"]["kernel"],
                                     host[0]["head"]["bias"], host[1]["model_state"],
                                     config.num_classes, steps=1)
  assert abs(whole_loss - expected_loss) > 1e-4


@pytest.mark.parametrize("steps,batch_size,message", [
    (0, 64, "grad_accum_steps=0 must be a positive integer"),
    (3, 64, "batch_size 64 is not divisible by grad_accum_steps=3 x 8 devices"),
    (16, 64, "use a batch_size that is a multiple of 128"),
])
def test_bad_grad_accum_steps_is_one_clear_line(steps, batch_size, message):
  config = tiny_config()
  config.batch_size = batch_size
  config.grad_accum_steps = steps
  with pytest.raises(ConfigError, match=message) as error:
    accumulate.grad_accum_steps(config)
  assert "\n" not in str(error.value)
