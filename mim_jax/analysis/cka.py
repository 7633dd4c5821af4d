"""Layer-wise representation similarity: mini-batch CKA with the unbiased HSIC
(docs/methods.md §8).

For every layer a of model A and b of model B (layer 0 = patch embedding, layer k =
block k's output after block k+1's LN1, the last after the final norm), each batch
gives linear Gram matrices K_a = X_a X_a^T and L_b = Y_b Y_b^T of the flattened
per-example features (B, N*d), and the unbiased estimator of Nguyen et al. (2021, eq. 3)

    HSIC_u(K, L) = [tr(KL) + 1^T K 1 1^T L 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))

(zeroed diagonals). HSIC(K_a, L_b), HSIC(K_a, K_a) and HSIC(L_b, L_b) are summed over
batches and CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)).

    result = cka_between(model_a, model_b, batches)     # CkaResult, .matrix (La, Lb)
    matrix = cka_of_features([(features_a, features_b, mask), ...])   # arrays (L, B, N, d)

Each model's Grams are computed once per batch inside its jitted forward pass (the
batch sharded over the devices; the (L, B, B) Grams are small), then one vmapped
HSIC gives every layer pair. Rows whose `mask` is False (padding) get zero rows and
columns in the Grams and n counts real rows only, which is exactly HSIC_u of the real rows.
"""

import dataclasses
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

MIN_BATCH = 4  # HSIC_u divides by n (n - 3)


def accumulation_dtype() -> Any:
  """float64 when jax_enable_x64 is on, else float32."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def check_batch_size(batch_size: int) -> None:
  if batch_size < MIN_BATCH:
    raise UserError(f"batch size {batch_size} is too small for CKA: the unbiased HSIC needs "
                    f"n > 3 examples per batch")


def check_layers(layers: Sequence[int] | None, depth: int, name: str) -> tuple[int, ...]:
  """The layers asked for (None = all, 0..depth), each checked to exist."""
  if layers is None:
    return tuple(range(depth + 1))
  layers = tuple(int(layer) for layer in layers)
  outside = [layer for layer in layers if not 0 <= layer <= depth]
  if not layers or outside:
    raise UserError(f"layers {list(layers)} of {name}: each must be in 0..{depth} (0 = patch "
                    f"embedding, k = block k), and at least one is needed")
  return layers


def gram_matrices(features: jax.Array, mask: jax.Array) -> jax.Array:
  """(L, B, ...) features, (B,) mask -> (L, B, B) Grams with zero diagonal and padding.

  Features are centred over the batch's real rows first: HSIC_u is invariant to that,
  and it removes the large common component that otherwise cancels in float32.
  """
  chex.assert_rank(mask, 1)
  chex.assert_equal(features.shape[1], mask.shape[0])
  x = features.reshape(features.shape[0], features.shape[1], -1).astype(accumulation_dtype())
  weight = mask.astype(x.dtype)[None, :, None]
  mean = (x * weight).sum(axis=1, keepdims=True) / jnp.maximum(weight.sum(axis=1,
                                                                          keepdims=True), 1)
  x = (x - mean) * weight
  grams = jnp.einsum("lbf,lcf->lbc", x, x)
  return grams * (1.0 - jnp.eye(grams.shape[-1], dtype=grams.dtype))


def hsic_unbiased(k: jax.Array, l: jax.Array, n: jax.Array) -> jax.Array:
  """HSIC_u of two (B, B) Grams with zero diagonals; n = real rows (the others are zero)."""
  chex.assert_rank([k, l], 2)
  chex.assert_equal_shape([k, l])
  trace = jnp.sum(k * l.T)
  sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
  cross = 2.0 / (n - 2) * (k.sum(axis=0) @ l.sum(axis=1))
  return (trace + sums - cross) / (n * (n - 3))


@jax.jit
def batch_hsic(grams_a: jax.Array, grams_b: jax.Array,
               n: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """HSIC(K_a, L_b) (La, Lb), HSIC(K_a, K_a) (La,), HSIC(L_b, L_b) (Lb,) of one batch."""
  n = jnp.asarray(n, grams_a.dtype)
  pair = jax.vmap(jax.vmap(hsic_unbiased, (None, 0, None)), (0, None, None))
  diagonal = jax.vmap(hsic_unbiased, (0, 0, None))
  return pair(grams_a, grams_b, n), diagonal(grams_a, grams_a, n), diagonal(grams_b, grams_b, n)


@dataclasses.dataclass(frozen=True)
class HsicSums:
  """HSIC values summed over batches (float64 on the host)."""
  cross: np.ndarray  # (La, Lb)
  self_a: np.ndarray  # (La,)
  self_b: np.ndarray  # (Lb,)
  num_examples: int = 0
  num_batches: int = 0

  @classmethod
  def zeros(cls, num_a: int, num_b: int) -> "HsicSums":
    return cls(np.zeros((num_a, num_b)), np.zeros(num_a), np.zeros(num_b))

  def add(self, grams_a: jax.Array, grams_b: jax.Array, n: int) -> "HsicSums":
    cross, self_a, self_b = jax.device_get(batch_hsic(grams_a, grams_b, n))
    return HsicSums(self.cross + cross, self.self_a + self_a, self.self_b + self_b,
                    self.num_examples + n, self.num_batches + 1)

  def cka(self) -> np.ndarray:
    """(La, Lb) CKA; NaN where a layer's features did not vary."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return self.cross / np.sqrt(np.outer(self.self_a, self.self_b))


def _real_rows(mask: Any, batch_size: int) -> int | None:
  """Real rows of a (global) batch; None (skip the batch) when padding leaves too few."""
  check_batch_size(batch_size)
  n = int(jax.device_get(jnp.sum(mask)))
  if n < MIN_BATCH:
    logging.info("CKA: skipping a batch with only %d real examples (padding)", n)
    return None
  return n


def cka_of_features(batches: Iterable[tuple[Any, Any, Any]]) -> np.ndarray:
  """Mini-batch CKA of precomputed features.

  Args:
    batches: (features_a (La, B, ...), features_b (Lb, B, ...), mask (B,) or None) per
      batch; the trailing (token, feature) dimensions are flattened per example.

  Returns:
    (La, Lb) CKA between every layer of A and every layer of B.
  """
  grams = jax.jit(gram_matrices)
  sums = None
  for features_a, features_b, mask in batches:
    features_a, features_b = jnp.asarray(features_a), jnp.asarray(features_b)
    if features_a.shape[1] != features_b.shape[1]:
      raise UserError(f"the two feature sets hold {features_a.shape[1]} and "
                      f"{features_b.shape[1]} examples; CKA needs the same examples")
    if features_a.ndim > 3 and features_a.shape[2] != features_b.shape[2]:
      raise UserError(f"token counts differ ({features_a.shape[2]} vs {features_b.shape[2]})")
    batch_size = features_a.shape[1]
    mask = jnp.ones(batch_size, bool) if mask is None else jnp.asarray(mask, bool)
    n = _real_rows(mask, batch_size)
    if n is None:
      continue
    sums = sums or HsicSums.zeros(features_a.shape[0], features_b.shape[0])
    sums = sums.add(grams(features_a, mask), grams(features_b, mask), n)
  if sums is None:
    raise UserError("no batch with at least 4 real examples: nothing to compute CKA on")
  return sums.cka()


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CkaResult:
  """CKA between `layers_a` of model A (rows) and `layers_b` of model B (columns)."""
  matrix: np.ndarray
  layers_a: tuple[int, ...]
  layers_b: tuple[int, ...]
  num_examples: int
  num_batches: int


def layer_grams_fn(model: inputs.LoadedModel, layers: Sequence[int]):
  """Jitted (params, uint8 images, mask) -> (L, B, B) Grams of the given layers."""
  @jax.jit
  def grams(params: Any, images: jax.Array, mask: jax.Array) -> jax.Array:
    hidden = model.model.apply({"params": params}, normalize_images(images),
                               capture_layers=tuple(layers))["hidden"]
    return gram_matrices(jnp.stack([hidden[layer] for layer in layers]), mask)

  return grams


def check_token_counts(model_a: inputs.LoadedModel, model_b: inputs.LoadedModel) -> None:
  if model_a.num_tokens != model_b.num_tokens:
    raise UserError(
        f"{model_a.name} has {model_a.num_tokens} tokens per image ({model_a.grid}x"
        f"{model_a.grid} patches of {model_a.patch_size} px at {model_a.image_size} px + cls) "
        f"and {model_b.name} has {model_b.num_tokens}; CKA compares per-example features of "
        f"the same tokens: use models with the same patch size and image size")
  if model_a.image_size != model_b.image_size:
    raise UserError(f"{model_a.name} reads {model_a.image_size} px images and {model_b.name} "
                    f"{model_b.image_size} px; load both at the same image_size")


def cka_between(model_a: inputs.LoadedModel, model_b: inputs.LoadedModel,
                batches: Iterable[Mapping[str, np.ndarray]], *,
                layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None,
                mesh: jax.sharding.Mesh | None = None) -> CkaResult:
  """CKA between the layers of two models over `batches` ({'image' uint8, 'mask'}).

  Args:
    layers_a, layers_b: layers to compare (0 = patch embedding .. depth); None = all.
    mesh: devices to split each batch over; None = all devices.

  Raises:
    UserError: token counts that differ, a batch smaller than 4, layers outside a model.
  """
  check_token_counts(model_a, model_b)
  layers_a = check_layers(layers_a, model_a.depth, model_a.name)
  layers_b = check_layers(layers_b, model_b.depth, model_b.name)
  mesh = mesh or inputs.analysis_mesh()
  params_a = inputs.replicate(model_a.params, mesh)
  params_b = inputs.replicate(model_b.params, mesh)
  grams_a, grams_b = layer_grams_fn(model_a, layers_a), layer_grams_fn(model_b, layers_b)
  sums = HsicSums.zeros(len(layers_a), len(layers_b))
  for batch in batches:
    check_batch_size(len(batch["image"]) * jax.process_count())
    device_batch = inputs.on_mesh(batch, mesh)
    n = _real_rows(device_batch["mask"], device_batch["image"].shape[0])
    if n is None:
      continue
    sums = sums.add(grams_a(params_a, device_batch["image"], device_batch["mask"]),
                    grams_b(params_b, device_batch["image"], device_batch["mask"]), n)
    logging.info("CKA %s vs %s: batch %d, %d examples", model_a.name, model_b.name,
                 sums.num_batches, sums.num_examples)
  if not sums.num_batches:
    raise UserError("no batch with at least 4 real examples: nothing to compute CKA on")
  return CkaResult(sums.cka(), layers_a, layers_b, sums.num_examples, sums.num_batches)
