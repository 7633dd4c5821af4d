"""Linear probing (MAE's protocol): LARS and BatchNorm against references, a frozen
encoder that stays bit-identical, and a short probe on a real labelled set."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from mim_jax import config_defaults
from mim_jax.convert import load_converted
from mim_jax.errors import UserError
from mim_jax.models import posembed
from mim_jax.tasks import linear_probe
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import checkpoint, loop, optim, sharding
from mim_jax.trainer.tree import flatten_with_names


def mae_lars_reference(params, grads_per_step, lrs, *, weight_decay, momentum, trust):
  """MAE's `util/lars.py` step in numpy (float64)."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for name, p in params.items():
      dp = grads[name].astype(np.float64)
      if p.ndim > 1:
        dp = dp + weight_decay * p
        param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
        q = trust * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
        dp = dp * q
      mu[name] = momentum * mu[name] + dp
      params[name] = p - lr * mu[name]
  return params


def test_lars_matches_maes_lars_step_for_step():
  rng = np.random.RandomState(0)
  params = {"kernel": rng.randn(6, 4).astype(np.float32), "bias": rng.randn(4).astype(np.float32),
            "zero": np.zeros((3, 2), np.float32)}
  grads = [{k: rng.randn(*v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(5)]
  schedule = optim.warmup_cosine(2.0, warmup_steps=2, total_steps=5)
  tx = optim.lars(schedule, momentum=0.9, weight_decay=0.05, trust_coefficient=0.001)
  state, current = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
  for g in grads:
    updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, current)
    current = optax.apply_updates(current, updates)
  expected = mae_lars_reference(params, grads, [float(schedule(i)) for i in range(5)],
                                weight_decay=0.05, momentum=0.9, trust=0.001)
  for name in params:
    np.testing.assert_allclose(current[name], expected[name], rtol=2e-5, atol=1e-7)
  assert not np.allclose(current["bias"], params["bias"])


def test_batchnorm_matches_torch_batchnorm1d():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(1)
  batches = [rng.randn(16, 8).astype(np.float32) * 3 + 1 for _ in range(3)]
  reference = torch.nn.BatchNorm1d(8, affine=False, eps=1e-6)
  running = {"mean": jnp.zeros(8), "var": jnp.ones(8)}
  for x in batches:
    reference.train()
    expected = reference(torch.from_numpy(x)).numpy()
    normed, running = linear_probe.batchnorm_train(jnp.asarray(x), running)
    np.testing.assert_allclose(normed, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(running["mean"], reference.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(running["var"], reference.running_var.numpy(), rtol=1e-5)
  reference.eval()
  np.testing.assert_allclose(linear_probe.batchnorm_eval(jnp.asarray(batches[0]), running),
                             reference(torch.from_numpy(batches[0])).numpy(), rtol=1e-4,
                             atol=1e-5)


@pytest.fixture(scope="module", name="pretrained_dir")
def pretrained_dir_fixture(tmp_path_factory):
  """A 1-step MAE pre-training run of the 32-wide, 2-block test model."""
  root = tmp_path_factory.mktemp("pre")
  config = tiny_config()
  config.total_steps = 1
  config.data.data_dir = str(root / "demo_tfds")
  loop.train(config, str(root / "run"), build_task(config))
  return str(root / "run")


def probe_config(data_dir, init="", pool="cls"):
  config = config_defaults.linear_probe_demo_overrides(config_defaults.linear_probe_config())
  config.model.update(variant="", width=32, depth=2, num_heads=4, pool=pool)
  config.init = init
  config.data.data_dir = data_dir
  config.data.worker_count = 0
  config.batch_size, config.eval_batch_size = 64, 64
  return config


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_probe_steps_leave_the_encoder_bit_identical(tmp_path, pretrained_dir, pool):
  config = probe_config(str(tmp_path / "tfds"), init=pretrained_dir, pool=pool)
  task = build_task(config)
  # Every encoder leaf is the pre-trained one, by value (fc_norm does not exist: gap
  # normalises without affine).
  source = flatten_with_names(load_converted(pretrained_dir).params["encoder"])
  frozen, meta = task.load_frozen()
  encoder = flatten_with_names(frozen["encoder"])
  # Pre-training's position embedding is the fixed sin-cos table, not a parameter.
  np.testing.assert_allclose(encoder.pop("pos_embed")[0, 1:],
                             posembed.sincos_2d(32, 4), atol=1e-6)
  assert set(encoder) == set(source) - ({"norm/scale", "norm/bias"} if pool == "gap" else set())
  for name, value in encoder.items():
    np.testing.assert_array_equal(value, source[name], err_msg=name)
  before = jax.tree.map(np.array, frozen)
  assert meta["encoder"]["path"] == pretrained_dir

  tx, schedule = loop.make_optimizer(config, jax.eval_shape(task.init_params,
                                                            jax.random.PRNGKey(0)), 10, 2)
  mesh = sharding.make_mesh(-1, 1)
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  state = init_state()
  assert set(state) == {"params", "opt_state", "step", "rng", "model_state"}
  assert set(flatten_with_names(state["params"])) == {"head/kernel", "head/bias"}
  frozen, frozen_shardings = loop.place_frozen(frozen, config, mesh)
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  rng = np.random.RandomState(0)
  head_before = np.array(state["params"]["head"]["kernel"])
  for _ in range(3):
    batch = {"image": rng.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8),
             "label": rng.randint(0, 10, (64,)).astype(np.int32)}
    state, metrics = step(state, frozen, sharding.global_batch(batch, mesh))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
  assert not np.allclose(state["params"]["head"]["kernel"], head_before)
  assert not np.allclose(state["model_state"]["var"], 1.0)
  assert np.isfinite(float(metrics["loss"]))
  # And the loss has no gradient into the encoder, not merely an unused one.
  encoder_grad = jax.grad(lambda enc: task.loss_fn(
      state["params"], {"model_state": state["model_state"]}, {"encoder": enc}, batch,
      jax.random.PRNGKey(0))[0])(frozen["encoder"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(encoder_grad))


@pytest.mark.slow
def test_short_probe_beats_chance_and_eval_matches_numpy(tmp_path, pretrained_dir):
  config = probe_config(str(tmp_path / "tfds"), init=pretrained_dir)
  config.total_steps, config.warmup_steps = 60, 6
  config.checkpoint_every, config.eval_every = 60, 60
  workdir = str(tmp_path / "probe")
  task = build_task(config)
  result = loop.train(config, workdir, task)
  assert result["val_top1"] > 30.0, result  # 10 classes: chance is 10%

  # The reported top-1 again, from the checkpointed head and statistics, in numpy.
  state = restore_state(workdir)
  kernel = np.asarray(state["params"]["head"]["kernel"], np.float64)
  bias = np.asarray(state["params"]["head"]["bias"], np.float64)
  mean = np.asarray(state["model_state"]["mean"], np.float64)
  var = np.asarray(state["model_state"]["var"], np.float64)
  from mim_jax.data import pipeline
  loader = pipeline.make_eval_loader(config.data, global_batch_size=64, image_size=32,
                                     worker_count=0, with_labels=True)
  features = jax.jit(task.features)
  hits, count = 0, 0
  for batch in loader:
    f = np.asarray(features(task.encoder_params, batch["image"]), np.float64)
    logits = (f - mean) / np.sqrt(var + 1e-6) @ kernel + bias
    keep = batch["mask"]
    hits += int(np.sum(np.argmax(logits, 1)[keep] == batch["label"][keep]))
    count += int(keep.sum())
  assert count == 355
  np.testing.assert_allclose(result["val_top1"], 100.0 * hits / count, rtol=1e-6)


def restore_state(workdir):
  """The latest checkpoint's state as host arrays, read with orbax directly."""
  import orbax.checkpoint as ocp
  ckpt = checkpoint.Checkpointer(workdir, 2)
  step = ckpt.latest_step()
  ckpt.close()
  return ocp.PyTreeCheckpointer().restore(os.path.join(ckpt.directory, str(step), "state"))


def test_probe_workdir_is_not_an_encoder(tmp_path, pretrained_dir):
  config = probe_config(str(tmp_path / "tfds"), init=pretrained_dir)
  config.total_steps, config.warmup_steps, config.checkpoint_every = 1, 0, 1
  config.eval_every = 0
  workdir = str(tmp_path / "probe")
  loop.train(config, workdir, build_task(config))
  with pytest.raises(UserError, match="linear-probe run.*frozen encoder is"):
    load_converted(workdir)


def test_resuming_with_another_encoder_is_refused(tmp_path, pretrained_dir):
  config = probe_config(str(tmp_path / "tfds"), init=pretrained_dir)
  config.total_steps, config.warmup_steps, config.checkpoint_every = 2, 0, 1
  config.eval_every = 0
  workdir = str(tmp_path / "probe")
  config.total_steps = 1
  loop.train(config, workdir, build_task(config))
  config.init, config.total_steps = "", 2  # a random encoder instead
  with pytest.raises(Exception, match="encoder"):
    loop.train(config, workdir, build_task(config))
