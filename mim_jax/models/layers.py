"""Small Linen layers shared by the backbones and heads: LayerNorm, Dense, MLP, DropPath.

Parameters are always float32 (`PARAM_DTYPE`); `dtype` is the compute dtype.
Two weight initialisations are offered (`WEIGHT_INITS`), each the one of its
reference code:

* 'mae': MAE's (xavier-uniform linear layers with zero bias; the patch projection
  xavier-uniform on its (width, 3*p*p) view; tokens N(0, 0.02));
* 'simmim': SimMIM's ViT (`VisionTransformerForSimMIM`), whose `_trunc_normal_`
  truncates N(0, 0.02) at +-1 std for every linear / conv weight and token, and
  whose `fix_init_weight` divides block i's attention output projection and second
  MLP layer by sqrt(2 i) (i = 1..depth);
* 'maskfeat': SlowFast's MViT / ViT (`MViT._init_weights`, used by MaskFeat):
  N(0, 0.02) linear and patch-conv weights (truncated at +-2, i.e. not at all),
  linear and LayerNorm biases at 0.02, tokens and a learned position embedding
  N(0, 0.02), the patch conv's bias at PyTorch's default U(+-1/sqrt(fan_in)).
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PARAM_DTYPE = jnp.float32
WEIGHT_INITS = ("mae", "simmim", "maskfeat")
Initializer = Callable[..., jax.Array]

xavier_uniform = nn.initializers.xavier_uniform()
mae_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                  out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)


def truncated_normal_one_std(std: float = 0.02) -> Initializer:
  """N(0, std) truncated at +-std (timm's `trunc_normal_(std=std, a=-std, b=std)`)."""
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = PARAM_DTYPE) -> jax.Array:
    return std * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)
  return init


def scaled(init: Initializer, factor: float) -> Initializer:
  def scaled_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = PARAM_DTYPE) -> jax.Array:
    return init(key, shape, dtype) * factor
  return scaled_init


def kernel_init(weight_init: str, *, block: int | None = None, rescaled: bool = False
                ) -> Initializer:
  """A dense kernel's init; `rescaled` (SimMIM's `fix_init_weight`) needs the 0-based block."""
  if weight_init == "mae":
    return xavier_uniform
  if weight_init == "simmim":
    init = truncated_normal_one_std()
    return scaled(init, 1.0 / math.sqrt(2.0 * (block + 1))) if rescaled else init
  if weight_init == "maskfeat":
    return token_init
  raise ValueError(f"weight_init={weight_init!r} is unknown; choose from {WEIGHT_INITS}")


def bias_init(weight_init: str) -> Initializer:
  """Linear and LayerNorm biases: 0, or MViT's 0.02 ('maskfeat')."""
  return nn.initializers.constant(0.02) if weight_init == "maskfeat" else nn.initializers.zeros


def patch_kernel_init(weight_init: str) -> Initializer:
  return {"mae": mae_patch_init, "simmim": truncated_normal_one_std(),
          "maskfeat": token_init}[weight_init]


def patch_bias_init(weight_init: str, fan_in: int) -> Initializer:
  """The patch projection's bias: 0, or PyTorch's default Conv2d bias ('maskfeat')."""
  if weight_init != "maskfeat":
    return nn.initializers.zeros
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=PARAM_DTYPE: jax.random.uniform(key, shape, dtype, -bound, bound)


def token_init_for(weight_init: str) -> Initializer:
  return token_init if weight_init in ("mae", "maskfeat") else truncated_normal_one_std()


def _normalize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(x - mean) / sqrt(var + eps) over the last axis, two-pass variance; and 1 / std."""
  centred = x - x.mean(axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array,
                   epsilon: float) -> jax.Array:
  """LayerNorm of float32 `x` over its last axis with (width,) `scale` and `bias`.

  The gradient is the closed form dx = (g' - mean(g') - x̂ mean(g' x̂)) / std with
  g' = g * scale, one fused expression. Autodiff of the forward instead hands the
  residual stream's cotangent one term for the centred path plus a broadcast of a
  per-token mean for the mean path; XLA:CPU may duplicate such cheap broadcast-adds
  into every consumer, and through them it re-summed the whole residual cotangent
  chain of the blocks above in each block's backward (work quadratic in depth: 30%
  of the ViT-Tiny MAE step on the CPU). One term per LayerNorm keeps it linear.
  """
  normalized, _ = _normalize(x, epsilon)
  return normalized * scale + bias


def _layer_norm_fwd(x, scale, bias, epsilon):
  normalized, inv_std = _normalize(x, epsilon)
  return normalized * scale + bias, (normalized, inv_std, scale)


def _layer_norm_bwd(epsilon, residuals, g):
  del epsilon
  normalized, inv_std, scale = residuals
  g_scaled = g * scale
  dx = inv_std * (g_scaled - g_scaled.mean(axis=-1, keepdims=True)
                  - normalized * jnp.mean(g_scaled * normalized, axis=-1, keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g * normalized, axis=batch_axes), jnp.sum(g, axis=batch_axes)


layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """PyTorch's LayerNorm (two-pass variance, statistics in float32), flax's param names.

  Written out rather than `nn.LayerNorm(use_fast_variance=False)`: that flag made
  the ViT-Tiny MAE step 1.7x slower on CPU (XLA); the closed-form gradient of
  `layer_norm_f32` makes the backward linear in depth on XLA:CPU.
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), PARAM_DTYPE)
    bias = self.param("bias", self.bias_init, (width,), PARAM_DTYPE)
    return layer_norm_f32(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(name: str, dtype: Any = jnp.float32, weight_init: str = "mae") -> LayerNorm:
  return LayerNorm(epsilon=1e-6, dtype=dtype, bias_init=bias_init(weight_init), name=name)


def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., d) @ kernel (d, f) -> (..., f), as one 2-D (prod(...), d) @ (d, f) matmul.

  Same products and sums as contracting the last axis of x directly, but the kernel
  gradient becomes a plain 2-D x^T g: for a 3-D x that gradient contracts two axes,
  and XLA:CPU first copied the cotangent into a transposed layout (a full
  read-and-write of every layer's output gradient, 11% of the MAE ViT-Tiny step).
  """
  flat = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return flat.reshape(x.shape[:-1] + kernel.shape[1:])


class Dense(nn.Module):
  """`nn.Dense` (same params, init and dtype promotion) applied with `matmul_last_axis`."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Initializer = xavier_uniform
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), PARAM_DTYPE)
    y = matmul_last_axis(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), PARAM_DTYPE).astype(self.dtype)
    return y


def dense(features: int, dtype: Any, name: str, *, init: Initializer = xavier_uniform,
          use_bias: bool = True, weight_init: str = "mae") -> Dense:
  return Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=init,
               bias_init=bias_init(weight_init), name=name)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2 (PyTorch's nn.GELU).

  `jax.nn.gelu(approximate=False)` is the same function written with erfc, whose XLA
  expansion (an exp and selects per element) costs twice erf's polynomial on the CPU.
  The gradient Phi(x) + x phi(x) is recomputed from x in the backward pass: kept
  from the forward (autodiff), erf(...) became a tensor of its own next to the
  output, written and read back (four extra passes over the block's widest
  activation, ~4% of the MAE ViT-Tiny step on the CPU).
  """
  return x * (0.5 * (1.0 + jax.lax.erf(x * _sqrt_half(x))))


def _sqrt_half(x: jax.Array) -> np.ndarray:
  return np.asarray(np.sqrt(0.5), x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  # Phi(x) as 1 - Phi(-x): the same bits (XLA's erf is exactly odd), but not the
  # forward's expression, which XLA would merge with this one and materialise again.
  cdf = 0.5 * (1.0 - jax.lax.erf(-x * _sqrt_half(x)))
  density = np.asarray(1 / np.sqrt(2 * np.pi), x.dtype) * jnp.exp(-0.5 * x * x)
  return (g * (cdf + x * density),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  weight_init: str = "mae"
  block: int | None = None  # 0-based block index (SimMIM's rescaled init of fc2)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = dense(self.hidden, self.dtype, "fc1", init=kernel_init(self.weight_init),
              weight_init=self.weight_init)(x)
    x = gelu(x)
    return dense(width, self.dtype, "fc2",
                 init=kernel_init(self.weight_init, block=self.block, rescaled=True),
                 weight_init=self.weight_init)(x)


def apply_drop_path(x: jax.Array, keep: float | jax.Array, rng: jax.Array) -> jax.Array:
  """Zeroes x per example with probability 1 - keep, scales the kept ones by 1 / keep.

  `keep` may be traced (a scanned per-block input); keep = 1 returns x exactly.
  """
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class DropPath(nn.Module):
  """Stochastic depth (timm's DropPath): zero a residual branch per example with
  probability `rate`, scale the kept ones by 1 / (1 - rate). Uses `rng`, or the
  'dropout' rng when none is given."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               rng: jax.Array | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return apply_drop_path(x, 1.0 - self.rate, self.make_rng("dropout") if rng is None else rng)
