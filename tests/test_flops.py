"""Analytic model FLOPs (used for MFU) against XLA's own count of the compiled forward."""

import jax
import jax.numpy as jnp

from mim_jax import flops
from mim_jax.models.vit import VisionTransformer


def test_encoder_flops_close_to_xla_cost_analysis():
  model = VisionTransformer(patch_size=16, width=192, depth=2, num_heads=12)
  images = jnp.zeros((1, 224, 224, 3))
  params = model.init(jax.random.PRNGKey(0), images)
  ids_keep = jnp.arange(49)[None]
  compiled = jax.jit(lambda p, x: model.apply(p, x, ids_keep=ids_keep)["tokens"]).lower(
      params, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = flops.vit_encoder_flops(49, 16, 192, 2)
  # XLA also counts norms, softmax, GELU and adds: a little above the matmul count.
  assert analytic <= cost["flops"] <= 1.15 * analytic, (analytic, cost["flops"])


def test_distillation_train_flops_close_to_xla_cost_analysis(tmp_path):
  """Student forward + backward and the teacher's forward, per image, vs XLA's count of
  the compiled gradient step (the 3x-forward rule over-counts the input layer's
  backward a little, which XLA skips)."""
  from conftest import make_teacher, tiny_distill_config
  from mim_jax.tasks.registry import build_task
  teacher = make_teacher(tmp_path / "t.npz", width=96, depth=2, num_heads=6, patch_size=16,
                         image_size=224)
  config = tiny_distill_config(teacher)
  config.image_size = 224
  config.model.update(patch_size=16, width=64, depth=2, num_heads=4)
  config.distill.attn_pairs = ((3, 2),)
  task = build_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  batch = {"image": jnp.zeros((2, 224, 224, 3), jnp.uint8)}
  compiled = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True)).lower(
      params, {}, task.load_frozen()[0], batch, jax.random.PRNGKey(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  per_image = cost["flops"] / 2
  analytic = task.train_flops_per_image()
  assert 0.85 * analytic <= per_image <= 1.15 * analytic, (analytic, per_image)
