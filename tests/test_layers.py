"""The hand-written gradients and layouts of models/layers.py against float64 torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_jax.models.layers import LayerNorm, layer_norm_f32


def torch_layer_norm_grads(x, scale, bias, cotangent, epsilon=1e-6):
  """Output and gradients of sum(LayerNorm(x) * cotangent) in float64 torch."""
  x, scale, bias = (torch.tensor(np.asarray(a, np.float64), requires_grad=True)
                    for a in (x, scale, bias))
  out = torch.nn.functional.layer_norm(x, x.shape[-1:], scale, bias, epsilon)
  (out * torch.tensor(np.asarray(cotangent, np.float64))).sum().backward()
  return [t.detach().numpy() for t in (out, x.grad, scale.grad, bias.grad)]


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_layer_norm_value_and_gradients_match_torch(offset):
  # A large per-token mean (trained residual streams have them) is where a one-pass
  # variance or a careless gradient loses precision; float32 inputs of that size
  # carry ~1e-7 * offset of rounding, whatever the formula (autodiff's too).
  rng = np.random.RandomState(0)
  x = (rng.standard_normal((3, 7, 24)) + offset * rng.standard_normal((3, 7, 1))).astype(np.float32)
  scale = (1 + 0.3 * rng.standard_normal(24)).astype(np.float32)
  bias = (0.3 * rng.standard_normal(24)).astype(np.float32)
  cotangent = rng.standard_normal(x.shape).astype(np.float32)

  def loss(x, scale, bias):
    return jnp.sum(layer_norm_f32(x, scale, bias, 1e-6) * cotangent)

  out = layer_norm_f32(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-6)
  grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  want = torch_layer_norm_grads(x, scale, bias, cotangent)
  for name, got, expected in zip(("out", "dx", "dscale", "dbias"), (out, *grads), want):
    error = np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()
    assert error < 5e-7 * (1 + offset), (name, error)


def test_layer_norm_module_computes_in_float32_and_casts_the_result():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16)).astype(jnp.bfloat16)
  module = LayerNorm(dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(1), x)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16
  expected = layer_norm_f32(x.astype(jnp.float32), jnp.ones(16), jnp.zeros(16), 1e-6)
  np.testing.assert_array_equal(out, expected.astype(jnp.bfloat16))
  grads = jax.grad(lambda p: module.apply(p, x).astype(jnp.float32).sum())(params)
  assert grads["params"]["scale"].dtype == jnp.float32
