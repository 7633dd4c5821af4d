"""Vision Transformer encoder (timm/MAE layout) that can expose attention logits.

Parameter names mirror timm's `VisionTransformer` (`patch_embed/proj`,
`blocks_{i}/attn/qkv`, `blocks_{i}/mlp/fc1`, `norm`, `fc_norm`, `head`) so the
PyTorch converter is a rename plus transposes.
"""

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import posembed

VARIANTS = {
    # name: (width, depth, heads). ViT-Tiny uses 12 heads (MAE-Lite), not timm's 3.
    "tiny": dict(width=192, depth=12, num_heads=12),
    "small": dict(width=384, depth=12, num_heads=12),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}

# MAE init: xavier-uniform linear layers with zero bias; the patch projection is
# xavier-uniform on its (width, 3*p*p) view, i.e. fan_out = width (not width*p*p).
dense_init = nn.initializers.xavier_uniform()
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                              out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)


def encoder_kwargs(variant: str | None = None, **overrides: Any) -> dict[str, Any]:
  """Keyword arguments for `VisionTransformer`: a named variant plus overrides (None = keep)."""
  kwargs: dict[str, Any] = {}
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f"unknown ViT variant {variant!r}; choose from {sorted(VARIANTS)}")
    kwargs.update(VARIANTS[variant])
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return kwargs


def layer_norm(name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; also returns the logits.

  With `logits_only` it stops after the scaled q k^T (D²-MAE's extra block has no
  output projection).
  """
  num_heads: int
  dtype: Any = jnp.float32
  logits_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array]:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, kernel_init=dense_init, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    if self.logits_only:
      return None, logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, tokens, width)
    out = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)
    return out, logits


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # exact erf GELU, as PyTorch's nn.GELU
    return nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="fc2")(x)


class DropPath(nn.Module):
  """Stochastic depth (timm's DropPath): zero a residual branch per example with
  probability `rate`, scale the kept ones by 1 / (1 - rate). Uses the 'dropout' rng."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block. Returns (output, attention logits, LN1(input))."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_only: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    normed = layer_norm("norm1", self.dtype)(x)
    attn_out, logits = Attention(self.num_heads, self.dtype, self.attention_only,
                                 name="attn")(normed)
    if self.attention_only:
      return x, logits, normed
    drop = DropPath(self.drop_path)
    x = x + drop(attn_out, deterministic)
    x = x + drop(Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype,
                     name="mlp")(layer_norm("norm2", self.dtype)(x)), deterministic)
    return x, logits, normed


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens (B, L, width) in raster order."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", kernel_init=patch_init, dtype=self.dtype, name="proj")(images)
    return x.reshape(x.shape[0], -1, self.width)


class VisionTransformer(nn.Module):
  """ViT encoder with a cls token.

  Attributes:
    posemb: 'sincos' (fixed constant, never a parameter: pre-training) or 'learn'
      (a `pos_embed` parameter initialised from sin-cos: fine-tuning).
    num_classes: 0 for no head.
    pool: 'cls' (final-norm cls token) or 'gap' (as timm/MAE fine-tuning: no final
      `norm`; mean of the patch tokens then `fc_norm`).
    extra_attention_block: D²-MAE's block `depth + 1` (params `blocks_{depth}`): LN1 and
      qkv on the last block's output, only for its attention logits (layer depth + 1).
      It changes no output; exports and fine-tuning drop it.
    drop_path_rate: stochastic depth of the last block; block i gets
      rate * i / (depth - 1) (timm's linspace), active only with `train=True`.
  """
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  posemb: str = "sincos"
  num_classes: int = 0
  pool: str = "cls"
  extra_attention_block: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  def grid_size(self, image_size: int) -> int:
    if image_size % self.patch_size:
      raise ValueError(f"image size {image_size} is not divisible by patch size {self.patch_size}")
    return image_size // self.patch_size

  def position_embedding(self, grid: int) -> jax.Array:
    """(1, 1 + grid**2, width), cls slot first."""
    table = posembed.sincos_2d(self.width, grid, cls_token=True)[None]
    if self.posemb == "sincos":
      return jnp.asarray(table)
    if self.posemb == "learn":
      return self.param("pos_embed", lambda *_: jnp.asarray(table))
    raise ValueError(f"unknown posemb {self.posemb!r}; use 'sincos' or 'learn'")

  @nn.compact
  def __call__(self, images: jax.Array, *, ids_keep: jax.Array | None = None,
               capture_layers: Sequence[int] = (),
               latent_layer: int | None = None, train: bool = False) -> dict[str, Any]:
    """Encodes normalised images (B, H, W, 3).

    Args:
      ids_keep: (B, K) indices of the patches to keep (MAE masking), in the order
        they are fed to the blocks; None keeps all patches in raster order.
      capture_layers: 1-based block indices whose pre-softmax attention logits
        (B, h, N, N) and representations (B, N, d) are returned. Representation of
        layer k = block-k output after block k+1's LN1 (after the final norm for
        the last block); layer 0 = the embedded tokens. With `extra_attention_block`,
        layer depth + 1 has attention logits only.
      latent_layer: also return 'latent', the final norm applied to the output of
        this block (D²-MAE's decoder reads block 8); None = no latent.
      train: enables stochastic depth (needs a 'dropout' rng when drop_path_rate > 0).

    Returns:
      dict with 'tokens' (B, N, d) final-norm output (raw for pool='gap'), 'attn_logits' and 'hidden'
      (dicts keyed by the captured layer), 'latent' if asked, and 'pooled'/'logits' when a
      head exists.
    """
    chex.assert_rank(images, 4)
    batch, height, width_px, _ = images.shape
    if height != width_px:
      raise ValueError(f"images must be square, got {height}x{width_px}")
    attention_layers = self.depth + int(self.extra_attention_block)
    for layer in capture_layers:
      if not 0 <= layer <= attention_layers:
        raise ValueError(f"capture layer {layer} outside 0..{attention_layers}")
    if latent_layer is not None and not 1 <= latent_layer <= self.depth:
      raise ValueError(f"latent layer {latent_layer} outside 1..{self.depth}")
    if latent_layer is not None and self.pool == "gap":
      raise ValueError("latent_layer needs the final norm, which pool='gap' models lack")
    grid = self.grid_size(height)

    x = PatchEmbed(self.patch_size, self.width, self.dtype, name="patch_embed")(images)
    pos = self.position_embedding(grid).astype(x.dtype)
    x = x + pos[:, 1:]
    if ids_keep is not None:
      chex.assert_rank(ids_keep, 2)
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    cls = self.param("cls_token", token_init, (1, 1, self.width)).astype(x.dtype) + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)

    attn_logits, hidden = {}, {}
    if 0 in capture_layers:
      hidden[0] = x
    latent_input = None
    for i in range(attention_layers):
      extra = i == self.depth
      x, logits, normed_input = Block(
          self.num_heads, self.mlp_ratio, self.dtype, attention_only=extra,
          drop_path=0.0 if extra else self.drop_path_rate * i / max(self.depth - 1, 1),
          name=f"blocks_{i}")(x, not train)
      if i in capture_layers and not extra:  # block i+1 normalises block i's output
        hidden[i] = normed_input
      if i + 1 in capture_layers:
        attn_logits[i + 1] = logits
      if i + 1 == latent_layer:
        latent_input = x
    final_norm = None if self.pool == "gap" else layer_norm("norm", self.dtype)
    tokens = x if final_norm is None else final_norm(x)
    if self.depth in capture_layers:
      hidden[self.depth] = tokens
    out: dict[str, Any] = {"tokens": tokens, "attn_logits": attn_logits, "hidden": hidden}
    if latent_input is not None:
      out["latent"] = final_norm(latent_input)

    if self.pool not in ("cls", "gap"):
      raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")
    if self.num_classes:
      if self.pool == "gap":
        pooled = layer_norm("fc_norm", self.dtype)(tokens[:, 1:].mean(axis=1))
      else:
        pooled = tokens[:, 0]
      out["pooled"] = pooled
      out["logits"] = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                               name="head")(pooled)
    return out
