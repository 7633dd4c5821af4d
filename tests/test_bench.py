"""The benchmark's PyTorch twin of the step: the same model sizes, a step that trains."""

import jax
import numpy as np
import pytest

from conftest import make_teacher, tiny_config
from mim_jax import config_defaults
from mim_jax.tasks.registry import build_task
from mim_jax.trainer.tree import count_params

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
from mim_jax import bench_torch  # noqa: E402


def configs(tmp_path):
  mae = tiny_config()
  d2mae = config_defaults.distillation_overrides(tiny_config(), decoupled=True)
  d2mae.model.decoder_layer = 1
  d2mae.distill.attn_pairs = ((3, 2),)
  d2mae.distill.teacher = make_teacher(tmp_path / "teacher.npz", width=48, depth=2,
                                       num_heads=6)
  d2mae.distill.teacher_variant = ""
  return {"mae": mae, "d2mae": d2mae}


@pytest.mark.parametrize("task", ["mae", "d2mae"])
def test_torch_step_trains_as_many_parameters_as_the_jax_task(tmp_path, task):
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
