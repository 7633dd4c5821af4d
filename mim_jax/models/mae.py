"""MAE: the ViT encoder on visible patches plus a light pixel-reconstruction decoder.

The decoder has its own compute dtype and remat setting (its blocks are never
scanned: MAE-Lite's decoder has one block); params are float32 as the encoder's.
"""

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import posembed
from mim_jax.models.vit import (PARAM_DTYPE, VisionTransformer, block_class, dense, layer_norm,
                                token_init)


class MAEDecoder(nn.Module):
  """Decoder of docs/methods.md §2: embed, append mask tokens, unshuffle, blocks, predict.

  Parameter names map to the MAE reference as `embed`->`decoder_embed`,
  `blocks_i`->`decoder_blocks.i`, `norm`->`decoder_norm`, `pred`->`decoder_pred`.
  """
  patch_size: int = 16
  width: int = 96
  depth: int = 1
  num_heads: int = 3
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: str = "explicit"  # nobody reads the decoder's attention logits

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """latent (B, 1 + K, d_enc) with cls first; ids_restore (B, L) -> (B, L, p*p*3)."""
    batch, num_tokens, _ = latent.shape
    num_patches = ids_restore.shape[1]
    grid = int(round(num_patches**0.5))
    chex.assert_equal(grid * grid, num_patches)
    x = dense(self.width, self.dtype, "embed")(latent)
    mask_token = self.param("mask_token", token_init, (1, 1, self.width),
                            PARAM_DTYPE).astype(x.dtype)
    masked = jnp.broadcast_to(mask_token, (batch, num_patches + 1 - num_tokens, self.width))
    patches = jnp.concatenate([x[:, 1:], masked], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(posembed.sincos_2d(self.width, grid, cls_token=True), x.dtype)[None]
    block = block_class(self.remat)
    for i in range(self.depth):
      x, _, _ = block(self.num_heads, self.mlp_ratio, self.dtype,
                      attention_impl=self.attention_impl, name=f"blocks_{i}")(x, True)
    x = layer_norm("norm", self.dtype)(x)
    x = dense(self.patch_size**2 * 3, self.dtype, "pred")(x)
    return x[:, 1:]


class MaskedAutoencoder(nn.Module):
  """Encoder (on the kept patches) + decoder; params {'encoder': ..., 'decoder': ...}.

  `decoder_layer`: the decoder reads the final norm of this block's output (D²-MAE:
  8); None = the last block, as in MAE.
  """
  encoder: VisionTransformer
  decoder: MAEDecoder
  decoder_layer: int | None = None

  def __call__(self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array,
               capture_layers: Sequence[int] = ()) -> tuple[jax.Array, dict[str, Any]]:
    """Returns the per-patch pixel prediction (B, L, p*p*3) and the encoder outputs."""
    encoded = self.encoder(images, ids_keep=ids_keep, capture_layers=capture_layers,
                           latent_layer=self.decoder_layer)
    latent = encoded["tokens"] if self.decoder_layer is None else encoded["latent"]
    return self.decoder(latent, ids_restore), encoded
