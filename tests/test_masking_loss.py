"""Masking and the MAE loss against a numpy reference written from docs/methods.md §2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking
from mim_jax.objectives import pixels


def numpy_mask(noise, ratio):
  batch, length = noise.shape
  keep = int(length * (1 - ratio))
  ids_shuffle = np.argsort(noise, axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1)
  mask = np.ones((batch, length))
  mask[:, :keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  return ids_shuffle[:, :keep], ids_restore, mask


def numpy_patchify(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c))
  for i in range(h // p):
    for j in range(w // p):
      patch = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # (b, row, col, ch)
      out[:, i * (w // p) + j] = patch.reshape(b, -1)
  return out


def numpy_loss(pred, target, mask):
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)  # unbiased, as torch.var()
  target = (target - mean) / (var + 1e-6) ** 0.5
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


def test_mask_matches_reference_and_counts():
  noise = np.random.RandomState(0).rand(4, 196).astype(np.float32)
  got = masking.mask_from_noise(jnp.asarray(noise), 0.75)
  ids_keep, ids_restore, mask = numpy_mask(noise, 0.75)
  assert got.ids_keep.shape == (4, 49)
  np.testing.assert_array_equal(got.ids_keep, ids_keep)  # kept order = ascending noise
  np.testing.assert_array_equal(got.ids_restore, ids_restore)
  np.testing.assert_array_equal(got.mask, mask)
  assert np.all(np.asarray(got.mask).sum(1) == 147)
  # Kept patches are exactly those with mask 0, and they are the lowest-noise ones.
  for b in range(4):
    assert set(np.where(np.asarray(got.mask[b]) == 0)[0]) == set(ids_keep[b])
    assert noise[b, ids_keep[b]].max() < np.delete(noise[b], ids_keep[b]).min()


def test_random_mask_is_deterministic_in_the_key():
  a = masking.random_mask(jax.random.PRNGKey(3), 2, 16, 0.5)
  b = masking.random_mask(jax.random.PRNGKey(3), 2, 16, 0.5)
  c = masking.random_mask(jax.random.PRNGKey(4), 2, 16, 0.5)
  np.testing.assert_array_equal(a.ids_keep, b.ids_keep)
  assert not np.array_equal(a.ids_keep, c.ids_keep)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_an_error(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.mask_from_noise(jnp.zeros((1, 16)), ratio)


def test_patchify_matches_reference_and_inverts():
  images = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  patches = pixels.patchify(jnp.asarray(images), 8)
  np.testing.assert_array_equal(patches, numpy_patchify(images, 8))
  np.testing.assert_array_equal(pixels.unpatchify(patches, 8), images)


def test_loss_matches_reference_with_unbiased_variance():
  rng = np.random.RandomState(2)
  target = rng.randn(3, 16, 48).astype(np.float32) * 2 + 1
  pred = rng.randn(3, 16, 48).astype(np.float32)
  _, _, mask = numpy_mask(rng.rand(3, 16), 0.75)
  got = pixels.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(got, numpy_loss(pred, target, mask), rtol=1e-5)
  # The biased variance would give a measurably different value: the test can tell.
  biased = ((target - target.mean(-1, keepdims=True)) /
            np.sqrt(target.var(-1, keepdims=True) + 1e-6))
  wrong = ((((pred - biased) ** 2).mean(-1)) * mask).sum() / mask.sum()
  assert abs(float(got) - wrong) > 1e-4


def test_loss_ignores_visible_patches():
  rng = np.random.RandomState(3)
  target = jnp.asarray(rng.randn(1, 8, 12).astype(np.float32))
  pred = jnp.asarray(rng.randn(1, 8, 12).astype(np.float32))
  mask = jnp.asarray([[1, 0, 1, 0, 0, 1, 0, 0]], jnp.float32)
  grads = jax.grad(lambda p: pixels.mae_loss(p, target, mask))(pred)
  assert np.all(np.asarray(grads)[0, mask[0] == 0] == 0)
  assert np.all(np.abs(np.asarray(grads)[0, mask[0] == 1]).sum(-1) > 0)
  plain = pixels.mae_loss(pred, target, mask, norm_pix=False)
  np.testing.assert_allclose(
      plain, ((np.asarray(pred) - np.asarray(target)) ** 2).mean(-1)[0, [0, 2, 5]].mean(),
      rtol=1e-5)
