"""Attention distance and entropy per head and layer (docs/methods.md §8, paper eqs. 2-4).

For a block's pre-softmax logits, the rows and columns of the prefix tokens (the
cls token) are dropped first and the softmax taken over the remaining patch keys
(fp32), so for query patch j

    D_j = sum_i p_ij G_ij      (G: Euclidean distance between patch centres, in pixels)
    E_j = -sum_i p_ij log p_ij

averaged over query patches and images. Sums and counts are accumulated over
batches, so the mean is over every real image (padding rows are left out).

    stats = attention_statistics(model, batches)    # .distance, .entropy (layers, heads)
    maps = attention_maps(model, images, query_token=27)  # (n, layers, heads, g, g)
"""

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mim_jax.analysis import inputs
from mim_jax.errors import UserError
from mim_jax.models.registry import TokenLayout
from mim_jax.tasks.base import normalize_images


def patch_distances(grid: int | tuple[int, int], patch_size: int) -> np.ndarray:
  """(L, L) distances in pixels between the centres of a rows x cols raster of patches."""
  rows_count, cols_count = (grid, grid) if isinstance(grid, int) else grid
  rows, cols = np.divmod(np.arange(rows_count * cols_count), cols_count)
  distance = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
  return (distance * patch_size).astype(np.float32)


def layout_of(num_tokens: int, patch_size: int) -> TokenLayout:
  """A ViT's layout from its token count: cls + a square grid (for bare logits)."""
  grid = math.isqrt(num_tokens - 1)
  if grid * grid != num_tokens - 1:
    raise ValueError(f"{num_tokens} tokens are not cls + a square grid of patches; give the "
                     f"model's token layout")
  return TokenLayout(1, (grid, grid), patch_size)


def patch_log_probs(logits: jax.Array, prefix_tokens: int = 1) -> jax.Array:
  """(..., N, N) logits -> (..., L, L) log-softmax over the patch keys only."""
  return jax.nn.log_softmax(logits[..., prefix_tokens:, prefix_tokens:].astype(jnp.float32),
                            axis=-1)


def head_sums(logits: jax.Array, mask: jax.Array, patch_size: int,
              layout: TokenLayout | None = None) -> tuple[jax.Array, jax.Array]:
  """Per head, distance and entropy summed over the real images and their query patches.

  Args:
    logits: (B, h, N, N) pre-softmax attention logits, prefix tokens first.
    mask: (B,) real rows.
    patch_size: pixels per grid unit.
    layout: the backbone's token layout; None = cls + a square grid.

  Returns:
    (distance_sum (h,), entropy_sum (h,)); divide by (real images x patches) for means.
  """
  chex.assert_rank(logits, 4)
  chex.assert_shape(mask, (logits.shape[0],))
  layout = layout or layout_of(logits.shape[-1], patch_size)
  log_p = patch_log_probs(logits, layout.prefix_tokens)
  p = jnp.exp(log_p)
  distances = jnp.asarray(patch_distances(layout.grid, layout.patch_size))
  distance = jnp.einsum("bhqk,qk->bhq", p, distances)
  entropy = -jnp.sum(p * log_p, axis=-1)
  weight = mask.astype(jnp.float32)[:, None, None]
  return (distance * weight).sum(axis=(0, 2)), (entropy * weight).sum(axis=(0, 2))


def head_statistics(logits: jax.Array, patch_size: int, mask: jax.Array | None = None,
                    layout: TokenLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Mean distance (pixels) and entropy per head of one batch of (B, h, N, N) logits."""
  mask = jnp.ones(logits.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
  layout = layout or layout_of(logits.shape[-1], patch_size)
  distance, entropy = head_sums(jnp.asarray(logits), mask, patch_size, layout)
  count = float(jnp.sum(mask)) * layout.num_patches
  return np.asarray(distance) / count, np.asarray(entropy) / count


def check_attention_layers(layers: Sequence[int] | None, depth: int,
                           name: str) -> tuple[int, ...]:
  """Blocks asked for (None = all, 1..depth), each checked to exist."""
  if layers is None:
    return tuple(range(1, depth + 1))
  layers = tuple(int(layer) for layer in layers)
  if not layers or any(not 1 <= layer <= depth for layer in layers):
    raise UserError(f"attention layers {list(layers)} of {name}: each must be a block in "
                    f"1..{depth}, and at least one is needed")
  return layers


@dataclasses.dataclass(frozen=True)
class AttentionStatistics:
  """Mean attention distance (pixels) and entropy (nats), each (layers, heads)."""
  distance: np.ndarray
  entropy: np.ndarray
  layers: tuple[int, ...]
  num_images: int


def attention_sums_fn(model: inputs.LoadedModel, layers: Sequence[int]):
  """Jitted (params, uint8 images, mask) -> distance and entropy sums, each (layers, heads)."""

  @jax.jit
  def sums(params: Any, images: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.model.apply({"params": params}, normalize_images(images),
                               capture_layers=tuple(layers))["attn_logits"]
    per_layer = [head_sums(logits[layer], mask, model.patch_size, model.layout)
                 for layer in layers]
    return (jnp.stack([d for d, _ in per_layer]), jnp.stack([e for _, e in per_layer]))

  return sums


def attention_statistics(model: inputs.LoadedModel, batches: Iterable[Mapping[str, np.ndarray]],
                         *, layers: Sequence[int] | None = None,
                         mesh: jax.sharding.Mesh | None = None) -> AttentionStatistics:
  """Distance and entropy of every head of `layers` (None = blocks 1..depth) over `batches`."""
  layers = check_attention_layers(layers, model.depth, model.name)
  mesh = mesh or inputs.analysis_mesh()
  params = inputs.replicate(model.params, mesh)
  sums_fn = attention_sums_fn(model, layers)
  distance = entropy = 0.0
  num_images = 0
  for batch in batches:
    device_batch = inputs.on_mesh(batch, mesh)
    batch_distance, batch_entropy = jax.device_get(
        sums_fn(params, device_batch["image"], device_batch["mask"]))
    distance = distance + batch_distance.astype(np.float64)
    entropy = entropy + batch_entropy.astype(np.float64)
    num_images += int(jax.device_get(jnp.sum(device_batch["mask"])))
    logging.info("Attention statistics of %s: %d images", model.name, num_images)
  if not num_images:
    raise UserError("no images: the data gave no batch with a real example")
  count = num_images * model.layout.num_patches
  return AttentionStatistics(distance / count, entropy / count, layers, num_images)


# ----------------------------------------------------------------------------
# One query token's attention, for figures
# ----------------------------------------------------------------------------
def query_attention(logits: jax.Array, query_token: int,
                    layout: TokenLayout | None = None) -> jax.Array:
  """(B, h, N, N) logits -> (B, h, rows, cols): patch `query_token`'s attention over patches."""
  chex.assert_rank(logits, 4)
  layout = layout or layout_of(logits.shape[-1], 1)
  p = jnp.exp(patch_log_probs(logits, layout.prefix_tokens)[:, :, query_token])
  return p.reshape(*p.shape[:2], *layout.grid)


def check_query_token(query_token: int, grid: int | tuple[int, int]) -> int:
  rows, cols = (grid, grid) if isinstance(grid, int) else grid
  if not 0 <= query_token < rows * cols:
    raise UserError(f"query token {query_token} is outside the {rows}x{cols} patches "
                    f"(0..{rows * cols - 1}, raster order, cls not counted)")
  return query_token


def attention_maps(model: inputs.LoadedModel, images: np.ndarray, query_token: int | None = None,
                   *, layers: Sequence[int] | None = None) -> np.ndarray:
  """(n, layers, heads, rows, cols) attention of patch `query_token` (None = the centre
  patch) in uint8 `images` (n, S, S, 3)."""
  chex.assert_rank(images, 4)
  layers = check_attention_layers(layers, model.depth, model.name)
  grid = model.layout.grid
  query_token = check_query_token(centre_token(grid) if query_token is None else query_token,
                                  grid)

  @jax.jit
  def maps(params: Any, images: jax.Array) -> jax.Array:
    logits = model.model.apply({"params": params}, normalize_images(images),
                               capture_layers=layers)["attn_logits"]
    return jnp.stack([query_attention(logits[layer], query_token, model.layout)
                      for layer in layers], axis=1)

  return np.asarray(maps(model.params, jnp.asarray(images)))


def centre_token(grid: int | tuple[int, int]) -> int:
  """The patch at the centre of the grid (raster index)."""
  rows, cols = (grid, grid) if isinstance(grid, int) else grid
  return cols * (rows // 2) + cols // 2
