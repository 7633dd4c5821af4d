"""The benchmark: its PyTorch twin of the step (same model sizes, a step that trains)
and the step breakdown."""

import jax
import numpy as np
import optax
import pytest

from conftest import make_teacher, tiny_config
from mim_jax import config_defaults, step_breakdown
from mim_jax.errors import ConfigError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer.tree import count_params


@pytest.fixture(name="torch")
def torch_fixture():
  pytest.importorskip("timm")
  return pytest.importorskip("torch")


def configs(tmp_path):
  mae = tiny_config()
  d2mae = config_defaults.distillation_overrides(tiny_config(), decoupled=True)
  d2mae.mae.decoder_layer = 1
  d2mae.distill.attn_pairs = ((3, 2),)
  d2mae.distill.teacher = make_teacher(tmp_path / "teacher.npz", width=48, depth=2,
                                       num_heads=6)
  d2mae.distill.teacher_variant = ""
  return {"mae": mae, "d2mae": d2mae}


@pytest.mark.parametrize("task", ["mae", "d2mae"])
def test_torch_step_trains_as_many_parameters_as_the_jax_task(tmp_path, task, torch):
  from mim_jax import bench_torch  # pylint: disable=import-outside-toplevel
  config = configs(tmp_path)[task]
  jax_task = build_task(config)
  jax_params = count_params(jax.eval_shape(jax_task.init_params, jax.random.PRNGKey(0)))
  torch.manual_seed(0)
  step, torch_params = bench_torch.build_step(config)
  assert torch_params == jax_params
  images = torch.from_numpy(np.random.RandomState(0).standard_normal(
      (config.batch_size, 3, config.image_size, config.image_size)).astype(np.float32))
  losses = [float(step(images)) for _ in range(3)]
  assert all(np.isfinite(losses)), losses


@pytest.mark.parametrize("task", ["mae", "d2mae"])
def test_breakdown_times_each_piece_of_a_pretraining_step(tmp_path, task):
  config = configs(tmp_path)[task]
  jax_task = build_task(config)
  params = jax_task.init_params(jax.random.PRNGKey(0))
  tx = optax.adamw(1e-3)
  state = {"params": params, "opt_state": tx.init(params)}
  frozen, _ = jax_task.load_frozen()
  batch = {"image": np.random.RandomState(0).randint(
      0, 256, (config.batch_size, config.image_size, config.image_size, 3)).astype(np.uint8)}
  result = step_breakdown.breakdown(jax_task, tx, state, frozen, batch, step_s=1.0, steps=1)
  pieces = (["teacher_forward", "student_forward"] if task == "d2mae" else ["forward"])
  pieces += ["backward", "optimizer_update", "unaccounted"]
  assert list(result) == [f"{piece}_{unit}" for piece in pieces
                          for unit in ("ms", "percent_of_step")]
  forward_ms = sum(result[f"{piece}_ms"] for piece in pieces[:-3])
  assert forward_ms > 0 and result["optimizer_update_ms"] > 0
  assert all(np.isfinite(list(result.values())))
  # The pieces add up to the step they were measured against (here a nominal 1 s).
  np.testing.assert_allclose(sum(result[f"{p}_percent_of_step"] for p in pieces), 100.0)


def test_breakdown_refuses_a_task_that_is_not_pretraining():
  config = config_defaults.finetune_config()
  with pytest.raises(ConfigError, match="--breakdown times pre-training steps"):
    step_breakdown.breakdown(build_task(config), None, {}, {}, {}, step_s=1.0, steps=1)


def test_torch_bench_reports_its_device_and_bf16_autocast(tmp_path, torch):
  from mim_jax import bench_torch  # pylint: disable=import-outside-toplevel
  config = configs(tmp_path)["mae"]
  config.model.dtype = "bfloat16"
  result = bench_torch.bench(config, steps=1)
  assert (result["device"], result["autocast"]) == ("cpu", "bfloat16")
  assert result["trained_params"] > 0 and result["step_ms"] > 0
  with pytest.raises(ValueError, match="torch_device='tpu'"):
    bench_torch.bench(config, steps=1, device="tpu")
