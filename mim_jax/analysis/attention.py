"""Attention distance and entropy per head and layer (docs/methods.md §8, paper eqs. 2-4).

For a block's pre-softmax logits, the cls row and column are dropped first and the
softmax taken over the remaining patch keys (fp32), so for query patch j

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
from mim_jax.tasks.base import normalize_images


def patch_distances(grid: int, patch_size: int) -> np.ndarray:
  """(L, L) distances in pixels between the centres of a grid x grid raster of patches."""
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  distance = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
  return (distance * patch_size).astype(np.float32)


def grid_of(num_tokens: int) -> int:
  """Side of the patch grid of `num_tokens` tokens (cls first)."""
  grid = math.isqrt(num_tokens - 1)
  if grid * grid != num_tokens - 1:
    raise ValueError(f"{num_tokens} tokens are not cls + a square grid of patches")
  return grid


def patch_log_probs(logits: jax.Array) -> jax.Array:
  """(..., N, N) logits (cls first) -> (..., N-1, N-1) log-softmax over patch keys only."""
  return jax.nn.log_softmax(logits[..., 1:, 1:].astype(jnp.float32), axis=-1)


def head_sums(logits: jax.Array, mask: jax.Array,
              patch_size: int) -> tuple[jax.Array, jax.Array]:
  """Per head, distance and entropy summed over the real images and their query patches.

  Args:
    logits: (B, h, N, N) pre-softmax attention logits, cls token first.
    mask: (B,) real rows.
    patch_size: pixels per grid unit.

  Returns:
    (distance_sum (h,), entropy_sum (h,)); divide by (real images x (N - 1)) for means.
  """
  chex.assert_rank(logits, 4)
  chex.assert_shape(mask, (logits.shape[0],))
  log_p = patch_log_probs(logits)
  p = jnp.exp(log_p)
  distances = jnp.asarray(patch_distances(grid_of(logits.shape[-1]), patch_size))
  distance = jnp.einsum("bhqk,qk->bhq", p, distances)
  entropy = -jnp.sum(p * log_p, axis=-1)
  weight = mask.astype(jnp.float32)[:, None, None]
  return (distance * weight).sum(axis=(0, 2)), (entropy * weight).sum(axis=(0, 2))


def head_statistics(logits: jax.Array, patch_size: int,
                    mask: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Mean distance (pixels) and entropy per head of one batch of (B, h, N, N) logits."""
  mask = jnp.ones(logits.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
  distance, entropy = head_sums(jnp.asarray(logits), mask, patch_size)
  count = float(jnp.sum(mask)) * (logits.shape[-1] - 1)
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
    per_layer = [head_sums(logits[layer], mask, model.patch_size) for layer in layers]
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
  count = num_images * model.grid**2
  return AttentionStatistics(distance / count, entropy / count, layers, num_images)


# ----------------------------------------------------------------------------
# One query token's attention, for figures
# ----------------------------------------------------------------------------
def query_attention(logits: jax.Array, query_token: int) -> jax.Array:
  """(B, h, N, N) logits -> (B, h, grid, grid): patch `query_token`'s attention over patches."""
  chex.assert_rank(logits, 4)
  grid = grid_of(logits.shape[-1])
  p = jnp.exp(patch_log_probs(logits)[:, :, query_token])
  return p.reshape(*p.shape[:2], grid, grid)


def check_query_token(query_token: int, grid: int) -> int:
  if not 0 <= query_token < grid * grid:
    raise UserError(f"query token {query_token} is outside the {grid}x{grid} patches "
                    f"(0..{grid * grid - 1}, raster order, cls not counted)")
  return query_token


def attention_maps(model: inputs.LoadedModel, images: np.ndarray, query_token: int | None = None,
                   *, layers: Sequence[int] | None = None) -> np.ndarray:
  """(n, layers, heads, grid, grid) attention of patch `query_token` (None = the centre
  patch) in uint8 `images` (n, S, S, 3)."""
  chex.assert_rank(images, 4)
  layers = check_attention_layers(layers, model.depth, model.name)
  grid = model.grid
  query_token = check_query_token(centre_token(grid) if query_token is None else query_token,
                                  grid)

  @jax.jit
  def maps(params: Any, images: jax.Array) -> jax.Array:
    logits = model.model.apply({"params": params}, normalize_images(images),
                               capture_layers=layers)["attn_logits"]
    return jnp.stack([query_attention(logits[layer], query_token) for layer in layers], axis=1)

  return np.asarray(maps(model.params, jnp.asarray(images)))


def centre_token(grid: int) -> int:
  """The patch at the centre of the grid (raster index)."""
  return grid * (grid // 2) + grid // 2
