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
  analytic = flops.vit_encoder_flops(196, 49, 16, 192, 2)
  # XLA also counts norms, softmax, GELU and adds: a little above the matmul count.
  assert analytic <= cost["flops"] <= 1.15 * analytic, (analytic, cost["flops"])
