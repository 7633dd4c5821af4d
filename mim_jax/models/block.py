"""The pre-norm transformer block of the ViT backbones, with optional rematerialisation."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.attention import Attention
from mim_jax.models.layers import PARAM_DTYPE, DropPath, Mlp, apply_drop_path, layer_norm

# 'block': save only each block's input, recompute the rest; 'block_dots': also save the
# outputs of the projections (qkv, proj, fc1, fc2), recompute attention and elementwise ops.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

class Block(nn.Module):
  """Pre-norm transformer block. Returns (output, attention logits, LN1(input)).

  The logits are None when `attention_impl` is not "explicit" (see `Attention`).
  `layer_scale` (BEiT / SimMIM's `init_values`) multiplies each residual branch by a
  learned per-channel `gamma_1` / `gamma_2` started at that value.

  `rng` (optional) is the block's stochastic-depth key (split between its two
  branches); `keep` (optional, traced) overrides `drop_path` with a keep
  probability, for the scan over blocks where the rate differs per block. `bias`
  is the shared relative position bias (or None); `positions` the kept tokens'
  indices for this block's own table.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_only: bool = False
  drop_path: float = 0.0
  attention_impl: str = "explicit"
  qkv_bias: str = "qkv"
  rel_pos_grid: int = 0
  layer_scale: float | None = None
  weight_init: str = "mae"
  index: int | None = None  # 0-based block index (SimMIM's rescaled init)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True, rng: jax.Array | None = None,
               keep: jax.Array | None = None, bias: jax.Array | None = None,
               positions: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    normed = layer_norm("norm1", self.dtype, self.weight_init)(x)
    attn_out, logits = Attention(self.num_heads, self.dtype, self.attention_only,
                                 self.attention_impl, self.qkv_bias, self.rel_pos_grid,
                                 self.weight_init, self.index, name="attn")(
                                     normed, bias, positions)
    if self.attention_only:
      return x, logits, normed
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    if keep is None:
      drop = DropPath(self.drop_path)
      branch = lambda y, key: drop(y, deterministic, key)
    else:
      branch = lambda y, key: y if deterministic else apply_drop_path(y, keep, key)
    width = x.shape[-1]
    if self.layer_scale is not None:
      gammas = [self.param(f"gamma_{i}", nn.initializers.constant(self.layer_scale), (width,),
                           PARAM_DTYPE).astype(self.dtype) for i in (1, 2)]
    else:
      gammas = [None, None]
    scale = lambda y, gamma: y if gamma is None else y * gamma
    x = x + branch(scale(attn_out, gammas[0]), rngs[0])
    mlp = Mlp(int(width * self.mlp_ratio), self.dtype, self.weight_init, self.index, name="mlp")
    x = x + branch(scale(mlp(layer_norm("norm2", self.dtype, self.weight_init)(x)), gammas[1]),
                   rngs[1])
    return x, logits, normed


def block_class(remat: str, scanned: bool = False) -> type[Block]:
  """`Block`, or `Block` under `nn.remat` with the named policy."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is unknown; choose from {sorted(REMAT_POLICIES)}")
  if REMAT_POLICIES[remat] is None:
    return Block
  # CSE prevention is only needed outside loops (jax.checkpoint's documentation).
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(2,),
                  prevent_cse=not scanned)
