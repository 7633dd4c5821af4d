"""Multi-head self-attention that can return its logits, and relative position bias.

Attention logits are float32 whatever the compute dtype (q k^T accumulates in
float32), so the softmax and the captured logits (distillation targets) are exact.

Options of the reference ViTs:

* `qkv_bias`: 'qkv' (timm / MAE: one bias on the fused projection), 'qv' (BEiT /
  SimMIM / MAE-Lite's RPE ViT: learnable q and v biases, k's bias fixed at 0;
  params `q_bias`, `v_bias`) or 'none';
* relative position bias (BEiT / SimMIM): a table of ((2g-1)^2 + 3, heads)
  learned biases indexed by the relative offset of two patches of a g x g grid,
  plus three entries for cls->patch, patch->cls and cls->cls, added to the
  logits; per block (`relative_position_bias_table` in the block's attention) or
  one shared by all blocks (`RelativePositionBias`). Tables start at 0, as in the
  reference code.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models.layers import PARAM_DTYPE, dense, kernel_init

QKV_BIASES = ("qkv", "qv", "none")
REL_POS_BIASES = ("none", "shared", "per_block")
# How a block whose attention logits nobody reads computes attention (a captured
# block always uses "explicit": its logits are an output). "xla" and "cudnn" call
# `jax.nn.dot_product_attention`, which never materialises the logits for the caller
# and, with "cudnn" (GPU, bfloat16), runs cuDNN's fused flash-attention kernel.
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")


def num_relative_distances(grid: int) -> int:
  """Rows of a relative position bias table for a grid x grid patch layout."""
  return (2 * grid - 1)**2 + 3


def relative_position_index(grid: int) -> np.ndarray:
  """(1 + g*g, 1 + g*g) int32 table rows, BEiT's `relative_position_index` (cls first).

  Patch i = (row, col) in raster order; the offset (dr, dc) of query i to key j maps to
  (dr + g - 1) * (2g - 1) + (dc + g - 1); cls->patch, patch->cls and cls->cls use the
  last three rows.
  """
  coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  relative = relative + (grid - 1)
  flat = relative[..., 0] * (2 * grid - 1) + relative[..., 1]
  size = num_relative_distances(grid)
  index = np.zeros((grid * grid + 1,) * 2, np.int32)
  index[1:, 1:] = flat
  index[0, :] = size - 3
  index[:, 0] = size - 2
  index[0, 0] = size - 1
  return index


def bias_from_table(table: jax.Array, grid: int, positions: jax.Array | None = None) -> jax.Array:
  """Bias (1 or B, heads, N, N) float32 from a (num_relative_distances, heads) table.

  `positions` (B, N) are the tokens' indices in the full cls + patches sequence (0 =
  cls) when patches were dropped (MAE masking); None = every token in order.
  """
  index = jnp.asarray(relative_position_index(grid))
  table = jnp.asarray(table)  # params read from a file are numpy arrays
  if positions is None:
    bias = table[index][None]  # (1, N, N, heads)
  else:
    bias = table[index[positions[:, :, None], positions[:, None, :]]]
  return jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)


def attention_logits(q: jax.Array, k: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """q k^T / sqrt(d) (+ bias), (B, h, N, N) float32, from q, k (B, N, h, d).

  In float32 the scale multiplies q (timm's order) rather than the logits: the same
  up to rounding, bit for bit at d = 16 or 64, and XLA:CPU fuses a scaled q into the
  copy it makes anyway, where scaling the logits materialised a (B, h, N, N) tensor
  of the constant for the matmul library. Other dtypes scale the float32 logits,
  which keeps the scale's rounding out of bfloat16.
  """
  scale = q.shape[-1]**-0.5
  if q.dtype == jnp.float32:
    q = q * jnp.float32(scale)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if q.dtype != jnp.float32:
    logits = logits * jnp.float32(scale)
  return logits if bias is None else logits + bias


def _softmax(logits: jax.Array) -> jax.Array:
  """`jax.nn.softmax` over the last axis: exp(x - max) / sum."""
  unnormalized = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  return unnormalized / unnormalized.sum(axis=-1, keepdims=True)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums the axes along which an array of `shape` was broadcast to x's shape."""
  axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None
              ) -> tuple[jax.Array, jax.Array]:
  """softmax(q k^T / sqrt(d) + bias) v (B, N, h, d) and the float32 logits (B, h, N, N).

  The gradient is written out from the saved probabilities: dlogits = p (dp - sum(p dp))
  (+ the logits' own cotangent, when they are distilled), dq = dlogits k / sqrt(d),
  dk = dlogits^T q / sqrt(d), dv = p^T dout. Autodiff of the same forward re-derived
  the probabilities from exp(...) and 1 / sum in the backward pass, and XLA:CPU
  materialised that reciprocal broadcast to (B, h, N, N) for every layer; written out,
  each pass of the softmax and of its gradient is one fusion with the matmul next to
  it (a third of the attention's time on the CPU).
  """
  logits = attention_logits(q, k, bias)
  return _attention_output(_softmax(logits), v), logits


def _attention_output(probs: jax.Array, v: jax.Array) -> jax.Array:
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _attention_fwd(q, k, v, bias):
  logits = attention_logits(q, k, bias)
  probs = _softmax(logits)
  return (_attention_output(probs, v), logits), (q, k, v, probs, bias)


def _attention_bwd(residuals, cotangents):
  q, k, v, probs, bias = residuals
  d_out, d_logits = cotangents
  d_v = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  d_logits = d_logits + probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
  scale = q.shape[-1]**-0.5
  if q.dtype != jnp.float32:  # the scale was applied to the float32 logits
    d_logits = d_logits * jnp.float32(scale)
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k)
  d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q)
  if q.dtype == jnp.float32:  # the scale was applied to q: d(q scale) = dq scale
    d_q, d_k = d_q * jnp.float32(scale), d_k * jnp.float32(scale)
  return d_q, d_k, d_v, d_bias


attention.defvjp(_attention_fwd, _attention_bwd)


class RelativePositionBias(nn.Module):
  """One bias table shared by every block (SimMIM's `USE_SHARED_RPB`)."""
  grid: int
  num_heads: int

  @nn.compact
  def __call__(self, positions: jax.Array | None = None) -> jax.Array:
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (num_relative_distances(self.grid), self.num_heads), PARAM_DTYPE)
    return bias_from_table(table, self.grid, positions)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; also returns the logits.

  With `logits_only` it stops after the scaled q k^T (+ bias) (D²-MAE's extra block has
  no output projection). With `impl` other than "explicit" the softmax(q k^T / sqrt(d)
  + bias) v product is `jax.nn.dot_product_attention` and the returned logits are None.
  `rel_pos_grid` > 0 gives this block its own relative position bias table; `bias`
  (the shared table's, or None) is added too.
  """
  num_heads: int
  dtype: Any = jnp.float32
  logits_only: bool = False
  impl: str = "explicit"
  qkv_bias: str = "qkv"
  rel_pos_grid: int = 0
  weight_init: str = "mae"
  block: int | None = None  # 0-based block index (SimMIM's rescaled init of proj)

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None,
               positions: jax.Array | None = None
               ) -> tuple[jax.Array | None, jax.Array | None]:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    if self.qkv_bias not in QKV_BIASES:
      raise ValueError(f"qkv_bias={self.qkv_bias!r} is unknown; choose from {QKV_BIASES}")
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, "qkv", init=kernel_init(self.weight_init),
                use_bias=self.qkv_bias == "qkv", weight_init=self.weight_init)(x)
    if self.qkv_bias == "qv":
      q_bias = self.param("q_bias", nn.initializers.zeros, (width,), PARAM_DTYPE)
      v_bias = self.param("v_bias", nn.initializers.zeros, (width,), PARAM_DTYPE)
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    # Split along the features (whose transpose concatenates the three gradients)
    # rather than indexing a (B, N, 3, h, d) view (whose transpose zero-pads each).
    q, k, v = (part.reshape(batch, tokens, self.num_heads, head_dim)
               for part in jnp.split(qkv, 3, axis=-1))
    if self.rel_pos_grid:
      table = self.param("relative_position_bias_table", nn.initializers.zeros,
                         (num_relative_distances(self.rel_pos_grid), self.num_heads),
                         PARAM_DTYPE)
      own = bias_from_table(table, self.rel_pos_grid, positions)
      bias = own if bias is None else bias + own
    proj = lambda out: dense(width, self.dtype, "proj", init=kernel_init(
        self.weight_init, block=self.block, rescaled=True), weight_init=self.weight_init)(
            out.reshape(batch, tokens, width))
    if self.impl != "explicit" and not self.logits_only:
      biased = None if bias is None else bias.astype(q.dtype)
      out = jax.nn.dot_product_attention(q, k, v, bias=biased, implementation=self.impl)
      return proj(out), None
    if self.logits_only:
      return None, attention_logits(q, k, bias)
    out, logits = attention(q, k, v, bias)
    return proj(out), logits
