"""Vision Transformer encoder (timm/MAE layout) that can expose attention logits.

Parameter names mirror timm's `VisionTransformer` (`patch_embed/proj`,
`blocks_{i}/attn/qkv`, `blocks_{i}/mlp/fc1`, `norm`, `fc_norm`, `head`) so the
PyTorch converter is a rename plus transposes.

Mixed precision. Parameters are always float32 (`PARAM_DTYPE`); `dtype` is the
compute dtype of the activations and matmuls (float32, or bfloat16 on TPU/GPU).
Images come in normalised in float32 and are cast by the patch projection. What
stays float32 whatever `dtype` is:
  * LayerNorm statistics and the normalisation itself (flax upcasts its input to
    float32 and casts only the result back to `dtype`); the variance is two-pass,
    as PyTorch's: E[x^2] - E[x]^2 loses all precision on residual streams with
    large per-token means (common in trained ViTs);
  * attention logits: q k^T accumulates into float32 (`preferred_element_type`),
    so the softmax and the captured logits (distillation targets) are float32;
    the probabilities are cast back to `dtype` for the value matmul;
  * the classification head (a (d, classes) matmul: negligible cost, and bfloat16
    logits would quantise the softmax);
  * every loss (the objectives cast their inputs to float32).
The residual stream, hidden representations and MLP run in `dtype`.

Memory. `remat` recomputes each block's activations in the backward pass
(`REMAT_POLICIES`); `scan_blocks` runs blocks 1..depth as one `nn.scan` (compile
time independent of depth). A scanned model's params hold the blocks stacked
under `SCANNED_BLOCKS` (leading axis = depth): everything outside the model
(train state, optimizer, checkpoints, converted files) keeps the per-block
`blocks_{i}` layout, and `mim_jax.models.scan` converts at `apply`.
"""

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import posembed
from mim_jax.models.attention import (ATTENTION_IMPLS, QKV_BIASES, REL_POS_BIASES,
                                      RelativePositionBias)
from mim_jax.models.block import REMAT_POLICIES, Block, block_class
from mim_jax.models.layers import (PARAM_DTYPE, WEIGHT_INITS, DropPath, LayerNorm, dense,
                                   layer_norm, token_init, token_init_for)
from mim_jax.models.patches import PatchEmbed

__all__ = ["ATTENTION_IMPLS", "Block", "DropPath", "LayerNorm", "PARAM_DTYPE", "REMAT_POLICIES",
           "SCANNED_BLOCKS", "VARIANTS", "VisionTransformer", "block_class", "dense",
           "layer_norm", "token_init"]

VARIANTS = {
    # name: (width, depth, heads). ViT-Tiny uses 12 heads (MAE-Lite), not timm's 3.
    "tiny": dict(width=192, depth=12, num_heads=12),
    "small": dict(width=384, depth=12, num_heads=12),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}
POSEMBS = ("sincos", "learn", "none")
SCANNED_BLOCKS = "scanned_blocks"


class VisionTransformer(nn.Module):
  """ViT encoder with a cls token.

  Attributes:
    posemb: 'sincos' (fixed constant, never a parameter: MAE pre-training), 'learn'
      (a `pos_embed` parameter initialised from sin-cos: fine-tuning) or 'none' (no
      absolute position embedding: SimMIM's ViT, with relative position bias).
    num_classes: 0 for no head.
    pool: 'cls' (final-norm cls token) or 'gap' (as timm/MAE fine-tuning: no final
      `norm`; mean of the patch tokens then `fc_norm`).
    qkv_bias: 'qkv' | 'qv' | 'none' (`models.attention`).
    rel_pos_bias: 'none' | 'shared' (one table, params `rel_pos_bias`) | 'per_block'
      (a table in every block's attention), BEiT / SimMIM's relative position bias.
    layer_scale: per-channel residual scales started at this value (BEiT / SimMIM's
      `init_values`), None = none.
    mask_token: a learned `mask_token` replaces the patch tokens `token_mask` marks,
      before the position embedding (SimMIM, MaskFeat, BEiT).
    weight_init: 'mae' | 'simmim' (`models.layers`).
    extra_attention_block: D²-MAE's block `depth + 1` (params `blocks_{depth}`): LN1 and
      qkv on the last block's output, only for its attention logits (layer depth + 1).
      It changes no output; exports and fine-tuning drop it.
    drop_path_rate: stochastic depth of the last block; block i gets
      rate * i / (depth - 1) (timm's linspace), active only with `train=True`. Block
      i's key is fold_in(dropout rng, i), scanned or not.
    dtype: compute dtype (see the module docstring); params are float32.
    remat: 'none' | 'block' | 'block_dots' (`REMAT_POLICIES`), for blocks 1..depth.
    scan_blocks: blocks 1..depth as one `nn.scan`; params under `SCANNED_BLOCKS`,
      stacked (`mim_jax.models.scan` converts from and to `blocks_{i}`). The extra
      attention block stays outside the scan. Same outputs as unscanned.
    attention_impl: `ATTENTION_IMPLS`: attention of the blocks whose logits are not
      captured (under scan: of all blocks, unless some block's logits are captured).
  """
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  posemb: str = "sincos"
  num_classes: int = 0
  pool: str = "cls"
  qkv_bias: str = "qkv"
  rel_pos_bias: str = "none"
  layer_scale: float | None = None
  mask_token: bool = False
  weight_init: str = "mae"
  extra_attention_block: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"
  scan_blocks: bool = False
  attention_impl: str = "explicit"

  def grid_size(self, image_size: int) -> int:
    if image_size % self.patch_size:
      raise ValueError(f"image size {image_size} is not divisible by patch size {self.patch_size}")
    return image_size // self.patch_size

  def position_embedding(self, grid: int) -> jax.Array | None:
    """(1, 1 + grid**2, width), cls slot first; None for posemb='none'."""
    if self.posemb == "none":
      return None
    table = posembed.sincos_2d(self.width, grid, cls_token=True)[None]
    if self.posemb == "sincos":
      return jnp.asarray(table)
    if self.posemb == "learn":  # MaskFeat's ViT learns it from N(0, 0.02); MAE's fine-tuning
      init = (token_init if self.weight_init == "maskfeat"  # starts from the sin-cos table
              else lambda *_: jnp.asarray(table, PARAM_DTYPE))
      return self.param("pos_embed", init, table.shape, PARAM_DTYPE)
    raise ValueError(f"unknown posemb {self.posemb!r}; choose from {POSEMBS}")

  def drop_rates(self) -> list[float]:
    return [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]

  def block_options(self) -> dict[str, Any]:
    """What every block of this encoder shares (the rest: rate, impl, index)."""
    return dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                qkv_bias=self.qkv_bias, layer_scale=self.layer_scale,
                weight_init=self.weight_init)

  def check_options(self, capture_layers: tuple[int, ...], latent_layer: int | None) -> None:
    attention_layers = self.depth + int(self.extra_attention_block)
    for layer in capture_layers:
      if not 0 <= layer <= attention_layers:
        raise ValueError(f"capture layer {layer} outside 0..{attention_layers}")
    if latent_layer is not None and not 1 <= latent_layer <= self.depth:
      raise ValueError(f"latent layer {latent_layer} outside 1..{self.depth}")
    if latent_layer is not None and self.pool == "gap":
      raise ValueError("latent_layer needs the final norm, which pool='gap' models lack")
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")
    for name, value, allowed in (("attention_impl", self.attention_impl, ATTENTION_IMPLS),
                                 ("qkv_bias", self.qkv_bias, QKV_BIASES),
                                 ("rel_pos_bias", self.rel_pos_bias, REL_POS_BIASES),
                                 ("weight_init", self.weight_init, WEIGHT_INITS)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; choose from {allowed}")

  @nn.compact
  def __call__(self, images: jax.Array, *, ids_keep: jax.Array | None = None,
               token_mask: jax.Array | None = None, capture_layers: Sequence[int] = (),
               latent_layer: int | None = None, train: bool = False) -> dict[str, Any]:
    """Encodes normalised images (B, H, W, 3).

    Args:
      ids_keep: (B, K) indices of the patches to keep (MAE masking), in the order
        they are fed to the blocks; None keeps all patches in raster order.
      token_mask: (B, L) 1 where the patch token is replaced by the mask token (needs
        `mask_token`); None = no replacement.
      capture_layers: 1-based block indices whose pre-softmax attention logits
        (B, h, N, N) and representations (B, N, d) are returned. Representation of
        layer k = block-k output after block k+1's LN1 (after the final norm for
        the last block); layer 0 = the embedded tokens. With `extra_attention_block`,
        layer depth + 1 has attention logits only.
      latent_layer: also return 'latent', the final norm applied to the output of
        this block (D²-MAE's decoder reads block 8); None = no latent.
      train: enables stochastic depth (needs a 'dropout' rng when drop_path_rate > 0).

    Returns:
      dict with 'tokens' (B, N, d) final-norm output (raw for pool='gap'), 'attn_logits'
      (float32) and 'hidden' (dicts keyed by the captured layer), 'latent' if asked, and
      'pooled'/'logits' (float32) when a head exists.
    """
    chex.assert_rank(images, 4)
    batch, height, width_px, _ = images.shape
    if height != width_px:
      raise ValueError(f"images must be square, got {height}x{width_px}")
    capture_layers = tuple(capture_layers)
    self.check_options(capture_layers, latent_layer)
    grid = self.grid_size(height)

    if ids_keep is not None:
      chex.assert_rank(ids_keep, 2)
    x = PatchEmbed(self.patch_size, self.width, self.dtype, self.weight_init,
                   name="patch_embed")(images, ids_keep)
    if self.mask_token:
      mask_token = self.param("mask_token", token_init_for(self.weight_init),
                              (1, 1, self.width), PARAM_DTYPE).astype(x.dtype)
      if token_mask is not None:
        chex.assert_shape(token_mask, x.shape[:2])
        replaced = token_mask[..., None].astype(x.dtype)
        x = x * (1 - replaced) + mask_token * replaced
    elif token_mask is not None:
      raise ValueError("token_mask needs an encoder built with mask_token=True")
    pos = self.position_embedding(grid)
    if pos is not None:
      pos = pos.astype(x.dtype)
      patch_pos = pos[:, 1:]
      if ids_keep is not None:
        patch_pos = jnp.take(patch_pos[0], ids_keep, axis=0)
      x = x + patch_pos
    cls = self.param("cls_token", token_init_for(self.weight_init), (1, 1, self.width),
                     PARAM_DTYPE).astype(x.dtype)
    if pos is not None:
      cls = cls + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)

    positions = None  # the tokens' places in the full sequence, for relative position bias
    if ids_keep is not None and self.rel_pos_bias != "none":
      positions = jnp.concatenate([jnp.zeros((batch, 1), ids_keep.dtype), ids_keep + 1], axis=1)
    bias = None
    if self.rel_pos_bias == "shared":
      bias = RelativePositionBias(grid, self.num_heads, name="rel_pos_bias")(positions)
    rel_pos_grid = grid if self.rel_pos_bias == "per_block" else 0

    drop_key = None
    if train and self.drop_path_rate > 0:
      drop_key = self.make_rng("dropout")
    blocks = self._scanned_blocks if self.scan_blocks else self._unrolled_blocks
    x, attn_logits, hidden, latent_input = blocks(x, capture_layers, latent_layer, train,
                                                  drop_key, bias, positions, rel_pos_grid)
    if self.extra_attention_block:
      _, logits, _ = Block(**self.block_options(), attention_only=True,
                           rel_pos_grid=rel_pos_grid, index=self.depth,
                           name=f"blocks_{self.depth}")(x, bias=bias, positions=positions)
      if self.depth + 1 in capture_layers:
        attn_logits[self.depth + 1] = logits

    final_norm = None if self.pool == "gap" else layer_norm("norm", self.dtype, self.weight_init)
    tokens = x if final_norm is None else final_norm(x)
    if self.depth in capture_layers:
      hidden[self.depth] = tokens
    out: dict[str, Any] = {"tokens": tokens, "attn_logits": attn_logits, "hidden": hidden}
    if latent_input is not None:
      out["latent"] = final_norm(latent_input)

    if self.num_classes:
      if self.pool == "gap":
        pooled = layer_norm("fc_norm", self.dtype, self.weight_init)(tokens[:, 1:].mean(axis=1))
      else:
        pooled = tokens[:, 0]
      out["pooled"] = pooled
      out["logits"] = dense(self.num_classes, jnp.float32, "head")(pooled.astype(jnp.float32))
    return out

  def _unrolled_blocks(self, x: jax.Array, capture_layers: tuple[int, ...],
                       latent_layer: int | None, train: bool, drop_key: jax.Array | None,
                       bias: jax.Array | None, positions: jax.Array | None, rel_pos_grid: int):
    """Blocks 1..depth as `blocks_{i}`: (x, attn_logits, hidden, latent input)."""
    attn_logits, hidden, latent_input = {}, {}, None
    block = block_class(self.remat)
    for i, rate in enumerate(self.drop_rates()):
      rng = None if drop_key is None else jax.random.fold_in(drop_key, i)
      impl = "explicit" if i + 1 in capture_layers else self.attention_impl
      x, logits, normed_input = block(**self.block_options(), drop_path=rate,
                                      attention_impl=impl, rel_pos_grid=rel_pos_grid, index=i,
                                      name=f"blocks_{i}")(x, not train, rng, None, bias,
                                                          positions)
      if i in capture_layers:  # block i+1 normalises block i's output (layer 0: embeddings)
        hidden[i] = normed_input
      if i + 1 in capture_layers:
        attn_logits[i + 1] = logits
      if i + 1 == latent_layer:
        latent_input = x
    return x, attn_logits, hidden, latent_input

  def _scanned_blocks(self, x: jax.Array, capture_layers: tuple[int, ...],
                      latent_layer: int | None, train: bool, drop_key: jax.Array | None,
                      bias: jax.Array | None, positions: jax.Array | None, rel_pos_grid: int):
    """Blocks 1..depth as one scan. What is captured is carried in one buffer per
    captured output, overwritten at its layer: memory of the captured layers only,
    not of all depth layers. (SimMIM's rescaled init depends on the block index, so
    init always goes through the unscanned twin, `models.scan.unscanned`.)"""
    batch, tokens, _ = x.shape
    # (buffer name, which output of the block, 0-based block index)
    wanted = [(f"attn_{k}", 1, k - 1) for k in capture_layers if 1 <= k <= self.depth]
    wanted += [(f"hidden_{k}", 2, k) for k in capture_layers if k < self.depth]
    if latent_layer is not None:
      wanted.append(("latent", 0, latent_layer - 1))
    logits_shape = (batch, self.num_heads, tokens, tokens)
    buffers = {name: jnp.zeros(logits_shape if output == 1 else x.shape,
                               jnp.float32 if output == 1 else x.dtype)
               for name, output, _ in wanted}
    layers: dict[str, jax.Array] = {"index": jnp.arange(self.depth)}
    if drop_key is not None:
      layers["rng"] = jax.vmap(lambda i: jax.random.fold_in(drop_key, i))(layers["index"])
      layers["keep"] = jnp.asarray([1.0 - rate for rate in self.drop_rates()], jnp.float32)
    shared = {"bias": bias, "positions": positions}  # the same for every block

    def body(block: Block, carry, layer):
      x, buffers, shared = carry
      outputs = block(x, not train, layer.get("rng"), layer.get("keep"), shared["bias"],
                      shared["positions"])
      buffers = {name: jnp.where(layer["index"] == index, outputs[output], buffers[name])
                 for name, output, index in wanted}
      return (outputs[0], buffers, shared), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.depth)
    captures_logits = any(1 <= k <= self.depth for k in capture_layers)
    block = block_class(self.remat, scanned=True)(
        **self.block_options(), rel_pos_grid=rel_pos_grid, name=SCANNED_BLOCKS,
        attention_impl="explicit" if captures_logits else self.attention_impl)
    (x, buffers, _), _ = scan(block, (x, buffers, shared), layers)
    attn_logits = {k: buffers[f"attn_{k}"] for k in capture_layers if 1 <= k <= self.depth}
    hidden = {k: buffers[f"hidden_{k}"] for k in capture_layers if k < self.depth}
    return x, attn_logits, hidden, buffers.get("latent")
