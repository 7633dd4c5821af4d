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
from mim_jax.models.patches import patchify

VARIANTS = {
    # name: (width, depth, heads). ViT-Tiny uses 12 heads (MAE-Lite), not timm's 3.
    "tiny": dict(width=192, depth=12, num_heads=12),
    "small": dict(width=384, depth=12, num_heads=12),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}

PARAM_DTYPE = jnp.float32
COMPUTE_DTYPES = ("float32", "bfloat16")
# 'block': save only each block's input, recompute the rest; 'block_dots': also save the
# outputs of the projections (qkv, proj, fc1, fc2), recompute attention and elementwise ops.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
SCANNED_BLOCKS = "scanned_blocks"
# How a block whose attention logits nobody reads computes attention (a captured
# block always uses "explicit": its logits are an output). "xla" and "cudnn" call
# `jax.nn.dot_product_attention`, which never materialises the logits for the caller
# and, with "cudnn" (GPU, bfloat16), runs cuDNN's fused flash-attention kernel.
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")

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


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype (float16 would need loss scaling)."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute dtype {name!r} is not supported; choose from {COMPUTE_DTYPES}")
  return jnp.dtype(name)


class LayerNorm(nn.Module):
  """PyTorch's LayerNorm (two-pass variance, statistics in float32), flax's param names.

  Written out rather than `nn.LayerNorm(use_fast_variance=False)`: that flag made
  the ViT-Tiny MAE step 1.7x slower on CPU (XLA), this is as fast as the fast one.
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), PARAM_DTYPE)
    bias = self.param("bias", nn.initializers.zeros, (width,), PARAM_DTYPE)
    x = x.astype(jnp.float32)
    centred = x - x.mean(axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def check_attention_impl(name: str) -> None:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={name!r} is unknown; choose from {ATTENTION_IMPLS}")


def layer_norm(name: str, dtype: Any = jnp.float32) -> LayerNorm:
  return LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=dense_init, dtype=dtype, param_dtype=PARAM_DTYPE,
                  name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; also returns the logits.

  The logits are float32 whatever `dtype` is. With `logits_only` it stops after the
  scaled q k^T (D²-MAE's extra block has no output projection). With `impl` other
  than "explicit" (`ATTENTION_IMPLS`) the softmax(q k^T / sqrt(d)) v product is
  `jax.nn.dot_product_attention` and the returned logits are None.
  """
  num_heads: int
  dtype: Any = jnp.float32
  logits_only: bool = False
  impl: str = "explicit"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, "qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.impl != "explicit" and not self.logits_only:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
      return dense(width, self.dtype, "proj")(out.reshape(batch, tokens, width)), None
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(head_dim**-0.5)
    if self.logits_only:
      return None, logits
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, tokens, width)
    return dense(width, self.dtype, "proj")(out), logits


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = dense(self.hidden, self.dtype, "fc1")(x)
    x = nn.gelu(x, approximate=False)  # exact erf GELU, as PyTorch's nn.GELU
    return dense(width, self.dtype, "fc2")(x)


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


class Block(nn.Module):
  """Pre-norm transformer block. Returns (output, attention logits, LN1(input)).

  The logits are None when `attention_impl` is not "explicit" (see `Attention`).

  `rng` (optional) is the block's stochastic-depth key (split between its two
  branches); `keep` (optional, traced) overrides `drop_path` with a keep
  probability, for the scan over blocks where the rate differs per block.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_only: bool = False
  drop_path: float = 0.0
  attention_impl: str = "explicit"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True, rng: jax.Array | None = None,
               keep: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    normed = layer_norm("norm1", self.dtype)(x)
    attn_out, logits = Attention(self.num_heads, self.dtype, self.attention_only,
                                 self.attention_impl, name="attn")(normed)
    if self.attention_only:
      return x, logits, normed
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    if keep is None:
      drop = DropPath(self.drop_path)
      branch = lambda y, key: drop(y, deterministic, key)
    else:
      branch = lambda y, key: y if deterministic else apply_drop_path(y, keep, key)
    x = x + branch(attn_out, rngs[0])
    mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")
    x = x + branch(mlp(layer_norm("norm2", self.dtype)(x)), rngs[1])
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


class PatchProjection(nn.Module):
  """The linear map of each flattened patch (p*p*3 pixels, `patches` order) to a token.

  Its params are those of `nn.Conv(width, (p, p), strides=p)` ('kernel' (p, p, 3,
  width), 'bias'), the layout timm's `patch_embed.proj` converts to, applied as one
  matmul to patches already cut out.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    kernel = self.param("kernel", patch_init, (self.patch_size, self.patch_size, 3, self.width),
                        PARAM_DTYPE)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), PARAM_DTYPE)
    kernel = kernel.reshape(-1, self.width).astype(self.dtype)
    return jnp.dot(patches.astype(self.dtype), kernel) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens (B, L, width) in raster order, or (B, K, width)
  for the patches `ids_keep` names, in its order.

  Cutting the kept patches out before projecting them is the same function as
  projecting every patch then dropping the masked ones (each token depends on its
  own patch only) at 1 - mask_ratio of the cost, in the forward and the backward
  pass; for a frozen ViT-B teacher on 224-px images the strided convolution over
  all 196 patches was 5% of a D²-MAE step on the CPU.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
    patches = patchify(images, self.patch_size)
    if ids_keep is not None:
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
    return PatchProjection(self.patch_size, self.width, self.dtype, name="proj")(patches)


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

  def position_embedding(self, grid: int) -> jax.Array:
    """(1, 1 + grid**2, width), cls slot first."""
    table = posembed.sincos_2d(self.width, grid, cls_token=True)[None]
    if self.posemb == "sincos":
      return jnp.asarray(table)
    if self.posemb == "learn":
      return self.param("pos_embed", lambda *_: jnp.asarray(table, PARAM_DTYPE))
    raise ValueError(f"unknown posemb {self.posemb!r}; use 'sincos' or 'learn'")

  def drop_rates(self) -> list[float]:
    return [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]

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
      dict with 'tokens' (B, N, d) final-norm output (raw for pool='gap'), 'attn_logits'
      (float32) and 'hidden' (dicts keyed by the captured layer), 'latent' if asked, and
      'pooled'/'logits' (float32) when a head exists.
    """
    chex.assert_rank(images, 4)
    batch, height, width_px, _ = images.shape
    if height != width_px:
      raise ValueError(f"images must be square, got {height}x{width_px}")
    attention_layers = self.depth + int(self.extra_attention_block)
    capture_layers = tuple(capture_layers)
    for layer in capture_layers:
      if not 0 <= layer <= attention_layers:
        raise ValueError(f"capture layer {layer} outside 0..{attention_layers}")
    if latent_layer is not None and not 1 <= latent_layer <= self.depth:
      raise ValueError(f"latent layer {latent_layer} outside 1..{self.depth}")
    if latent_layer is not None and self.pool == "gap":
      raise ValueError("latent_layer needs the final norm, which pool='gap' models lack")
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")
    check_attention_impl(self.attention_impl)
    grid = self.grid_size(height)

    if ids_keep is not None:
      chex.assert_rank(ids_keep, 2)
    x = PatchEmbed(self.patch_size, self.width, self.dtype, name="patch_embed")(images, ids_keep)
    pos = self.position_embedding(grid).astype(x.dtype)
    patch_pos = pos[:, 1:]
    if ids_keep is not None:
      patch_pos = jnp.take(patch_pos[0], ids_keep, axis=0)
    x = x + patch_pos
    cls = self.param("cls_token", token_init, (1, 1, self.width),
                     PARAM_DTYPE).astype(x.dtype) + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)

    drop_key = None
    if train and self.drop_path_rate > 0:
      drop_key = self.make_rng("dropout")
    blocks = self._scanned_blocks if self.scan_blocks else self._unrolled_blocks
    x, attn_logits, hidden, latent_input = blocks(x, capture_layers, latent_layer, train,
                                                  drop_key)
    if self.extra_attention_block:
      _, logits, _ = Block(self.num_heads, self.mlp_ratio, self.dtype, attention_only=True,
                           name=f"blocks_{self.depth}")(x)
      if self.depth + 1 in capture_layers:
        attn_logits[self.depth + 1] = logits

    final_norm = None if self.pool == "gap" else layer_norm("norm", self.dtype)
    tokens = x if final_norm is None else final_norm(x)
    if self.depth in capture_layers:
      hidden[self.depth] = tokens
    out: dict[str, Any] = {"tokens": tokens, "attn_logits": attn_logits, "hidden": hidden}
    if latent_input is not None:
      out["latent"] = final_norm(latent_input)

    if self.num_classes:
      if self.pool == "gap":
        pooled = layer_norm("fc_norm", self.dtype)(tokens[:, 1:].mean(axis=1))
      else:
        pooled = tokens[:, 0]
      out["pooled"] = pooled
      out["logits"] = dense(self.num_classes, jnp.float32, "head")(pooled.astype(jnp.float32))
    return out

  def _unrolled_blocks(self, x: jax.Array, capture_layers: tuple[int, ...],
                       latent_layer: int | None, train: bool, drop_key: jax.Array | None):
    """Blocks 1..depth as `blocks_{i}`: (x, attn_logits, hidden, latent input)."""
    attn_logits, hidden, latent_input = {}, {}, None
    block = block_class(self.remat)
    for i, rate in enumerate(self.drop_rates()):
      rng = None if drop_key is None else jax.random.fold_in(drop_key, i)
      impl = "explicit" if i + 1 in capture_layers else self.attention_impl
      x, logits, normed_input = block(self.num_heads, self.mlp_ratio, self.dtype,
                                      drop_path=rate, attention_impl=impl,
                                      name=f"blocks_{i}")(x, not train, rng)
      if i in capture_layers:  # block i+1 normalises block i's output (layer 0: embeddings)
        hidden[i] = normed_input
      if i + 1 in capture_layers:
        attn_logits[i + 1] = logits
      if i + 1 == latent_layer:
        latent_input = x
    return x, attn_logits, hidden, latent_input

  def _scanned_blocks(self, x: jax.Array, capture_layers: tuple[int, ...],
                      latent_layer: int | None, train: bool, drop_key: jax.Array | None):
    """Blocks 1..depth as one scan. What is captured is carried in one buffer per
    captured output, overwritten at its layer: memory of the captured layers only,
    not of all depth layers."""
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

    def body(block: Block, carry, layer):
      x, buffers = carry
      outputs = block(x, not train, layer.get("rng"), layer.get("keep"))
      buffers = {name: jnp.where(layer["index"] == index, outputs[output], buffers[name])
                 for name, output, index in wanted}
      return (outputs[0], buffers), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.depth)
    captures_logits = any(1 <= k <= self.depth for k in capture_layers)
    block = block_class(self.remat, scanned=True)(
        self.num_heads, self.mlp_ratio, self.dtype, name=SCANNED_BLOCKS,
        attention_impl="explicit" if captures_logits else self.attention_impl)
    (x, buffers), _ = scan(block, (x, buffers), layers)
    attn_logits = {k: buffers[f"attn_{k}"] for k in capture_layers if 1 <= k <= self.depth}
    hidden = {k: buffers[f"hidden_{k}"] for k in capture_layers if k < self.depth}
    return x, attn_logits, hidden, buffers.get("latent")
