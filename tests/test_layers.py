"""The hand-written gradients of models/layers.py and attention.py against float64 torch."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_jax.models.attention import attention
from mim_jax.models.layers import Dense, LayerNorm, gelu, layer_norm_f32
from mim_jax.models.vit import VisionTransformer


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


def test_gelu_value_and_gradient_match_torch():
  # 1 + erf(x / sqrt(2)) cancels for very negative x (PyTorch's float32 GELU too):
  # absolute errors of float32's epsilon there.
  x = np.linspace(-9, 9, 2001).astype(np.float32)
  x_t = torch.tensor(x.astype(np.float64), requires_grad=True)
  torch.nn.functional.gelu(x_t).sum().backward()
  want = torch.nn.functional.gelu(x_t).detach().numpy()
  np.testing.assert_allclose(gelu(jnp.asarray(x)), want, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: gelu(x).sum())(jnp.asarray(x)),
                             x_t.grad.numpy(), rtol=2e-6, atol=1e-6)


def test_dense_has_nn_dense_params_init_and_output():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 12))
  ours, flax_dense = Dense(7), nn.Dense(7, kernel_init=nn.initializers.xavier_uniform())
  params = ours.init(jax.random.PRNGKey(1), x)
  reference = flax_dense.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
  np.testing.assert_array_equal(params["params"]["kernel"], reference["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6,
                             atol=1e-6)


def torch_attention(q, k, v, bias, d_out, d_logits):
  """MAE-Lite's attention in float64: (out, logits) and the gradients of
  sum(out * d_out) + sum(logits * d_logits) with respect to q, k, v and bias."""
  q, k, v, bias = (torch.tensor(np.asarray(a, np.float64), requires_grad=True)
                   for a in (q, k, v, bias))
  logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1]**-0.5 + bias
  out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
  ((out * torch.tensor(np.asarray(d_out, np.float64))).sum()
   + (logits * torch.tensor(np.asarray(d_logits, np.float64))).sum()).backward()
  return [t.detach().numpy() for t in (out, logits, q.grad, k.grad, v.grad, bias.grad)]


@pytest.mark.parametrize("bias_batch", [0, 1, 3])  # 0: no bias
@pytest.mark.parametrize("head_dim", [16, 12])  # 1/sqrt(12) is not a power of two
def test_attention_value_and_gradients_match_torch(bias_batch, head_dim):
  rng = np.random.RandomState(head_dim + bias_batch)
  q, k, v = (rng.standard_normal((3, 7, 2, head_dim)).astype(np.float32) for _ in range(3))
  bias = rng.standard_normal((max(bias_batch, 1), 2, 7, 7)).astype(np.float32)
  d_out = rng.standard_normal(q.shape).astype(np.float32)
  d_logits = rng.standard_normal((3, 2, 7, 7)).astype(np.float32)
  used_bias = jnp.asarray(bias) if bias_batch else None

  def loss(q, k, v, bias):
    out, logits = attention(q, k, v, bias)
    return jnp.sum(out * d_out) + jnp.sum(logits * d_logits)

  out, logits = attention(q, k, v, used_bias)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, used_bias)
  want = torch_attention(q, k, v, bias if bias_batch else 0 * bias, d_out, d_logits)
  names = ("out", "logits", "dq", "dk", "dv", "dbias")
  for name, got, expected in zip(names, (out, logits, *grads), want):
    if got is None:
      assert name == "dbias" and not bias_batch
      continue
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_attention_in_bfloat16_follows_float32():
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 9, 2, 12))
  d_out = jax.random.normal(jax.random.PRNGKey(1), q.shape)

  def loss(q, k, v):
    out, logits = attention(q, k, v, None)
    assert logits.dtype == jnp.float32 and out.dtype == q.dtype
    return jnp.sum(out.astype(jnp.float32) * d_out)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  exact = grad(q, k, v)
  half = grad(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
  for e, h in zip(exact, half):
    assert h.dtype == jnp.bfloat16
    np.testing.assert_allclose(h.astype(jnp.float32), e, atol=0.05 * float(jnp.abs(e).max()))


def test_backward_fusions_stay_linear_in_depth():
  """No fusion of the compiled ViT gradient re-reads the residual stream of all blocks.

  With autodiff's LayerNorm gradient, XLA:CPU summed the residual stream's cotangent
  afresh in each block's backward: fusions of ~4 * depth operands, a cost quadratic
  in depth (30% of the MAE ViT-Tiny step; a 139-operand fusion for this model, 15
  without). A block's own backward needs a bounded number whatever the depth.
  """
  model = VisionTransformer(patch_size=8, width=16, depth=8, num_heads=2)
  images = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, images)["tokens"] ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  operands = [call.count("%") for call in re.findall(r"= \S+ fusion\((.*?)\), kind", hlo)]
  assert operands and max(operands) < 30, max(operands)
