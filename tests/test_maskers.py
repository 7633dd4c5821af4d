"""Block-wise (BEiT / MaskFeat) and SimMIM maskers against transcriptions of the references."""

import functools
import math
import pickle
import random

import jax
import numpy as np
import pytest

from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.maskers import mask_patches
from mim_jax.maskers.blockwise import BlockwiseMasker

# ---------------------------------------------------------------------------------------
# Block-wise masking: unilm beit/masking_generator.py, transcribed with its random source
# made an argument (the reference calls the `random` module's uniform and randint).


class ReferenceMaskingGenerator:
  """BEiT's MaskingGenerator, line for line, drawing from `draws`."""

  def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
               min_aspect=0.3, max_aspect=None):
    if not isinstance(input_size, tuple):
      input_size = (input_size,) * 2
    self.height, self.width = input_size
    self.num_masking_patches = num_masking_patches
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def _mask(self, mask, max_mask_patches, draws):
    delta = 0
    for _ in range(10):
      target_area = draws.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(draws.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = draws.randint(0, self.height - h)
        left = draws.randint(0, self.width - w)
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    return delta

  def __call__(self, draws):
    mask = np.zeros(shape=(self.height, self.width), dtype=int)
    mask_count = 0
    while mask_count < self.num_masking_patches:
      max_mask_patches = self.num_masking_patches - mask_count
      max_mask_patches = min(max_mask_patches, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches, draws)
      if delta == 0:
        break
      mask_count += delta
    return mask


class Recorder:
  """A numpy Generator that logs every draw the masker makes."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)
    self.log = []

  def random(self):
    value = self.rng.random()
    self.log.append(("random", value))
    return value

  def integers(self, low, high, endpoint=False):
    value = self.rng.integers(low, high, endpoint=endpoint)
    self.log.append(("randint", low, high if endpoint else high - 1, value))
    return value


class Replay:
  """Python `random`'s uniform / randint, answered from a Recorder's log in order."""

  def __init__(self, log):
    self.log = list(log)

  def uniform(self, a, b):
    kind, value = self.log.pop(0)
    assert kind == "random"
    return a + (b - a) * value  # CPython's random.uniform

  def randint(self, a, b):
    kind, low, high, value = self.log.pop(0)
    assert (kind, low, high) == ("randint", a, b)
    return value


class StdlibAsGenerator:
  """Python's random.Random behind the two Generator methods the masker calls."""

  def __init__(self, seed):
    self.rng = random.Random(seed)

  def random(self):
    return self.rng.random()

  def integers(self, low, high, endpoint=False):
    assert endpoint
    return self.rng.randint(low, high)


BLOCKWISE_SETTINGS = [  # (grid, num, min, max, min_aspect, max_aspect)
    (14, 75, 16, None, 0.3, None),   # BEiT
    (14, 78, 15, None, 0.3, None),   # MaskFeat, images
    ((6, 9), 20, 4, 6, 0.5, 3.0),    # rectangular grid, capped blocks
    (4, 12, 4, None, 0.3, None),     # crowded: often falls short
    (3, 2, 1, None, 1.0, None),      # square blocks only
]


def masker_and_reference(grid, num, low, high, min_aspect, max_aspect):
  masker = BlockwiseMasker(grid, num, min_num_patches=low, max_num_patches=high,
                           min_aspect=min_aspect, max_aspect=max_aspect)
  reference = ReferenceMaskingGenerator(grid if isinstance(grid, int) else tuple(grid), num,
                                        low, high, min_aspect, max_aspect)
  return masker, reference


@pytest.mark.parametrize("setting", BLOCKWISE_SETTINGS)
def test_blockwise_equals_reference_on_the_same_draws(setting):
  masker, reference = masker_and_reference(*setting)
  for seed in range(150):
    recorder = Recorder(seed)
    mask = masker.make(recorder)
    replay = Replay(recorder.log)
    want = reference(replay)
    assert not replay.log  # the reference made exactly the draws the masker made
    assert mask.dtype == bool and mask.shape == masker.grid
    np.testing.assert_array_equal(mask, want.astype(bool), err_msg=f"seed {seed}")
    # And driven by Python's own random.Random, as the reference is.
    np.testing.assert_array_equal(masker.make(StdlibAsGenerator(seed)),
                                  reference(random.Random(seed)).astype(bool))


def test_blockwise_count_falls_short_as_the_reference():
  masker, reference = masker_and_reference(4, 12, 4, None, 0.3, None)
  counts = np.array([masker.make(StdlibAsGenerator(seed)).sum() for seed in range(100)])
  want = np.array([reference(random.Random(seed)).sum() for seed in range(100)])
  np.testing.assert_array_equal(counts, want)
  assert counts.max() <= 12 and (counts < 12).any()  # never over, sometimes short
  maskfeat = BlockwiseMasker.maskfeat()
  counts = [maskfeat.make(np.random.default_rng(seed)).sum() for seed in range(50)]
  assert maskfeat.num_masking_patches == 78 and maskfeat.min_num_patches == 15
  assert max(counts) <= 78 and np.mean(counts) > 70


def test_blockwise_is_deterministic_per_seed_and_picklable():
  masker = BlockwiseMasker.beit()
  assert (masker.grid, masker.num_masking_patches, masker.min_num_patches) == ((14, 14), 75, 16)
  copy = pickle.loads(pickle.dumps(masker))
  a = masker.make(np.random.default_rng(7))
  np.testing.assert_array_equal(a, copy.make(np.random.default_rng(7)))
  others = [masker.make(np.random.default_rng(seed)) for seed in range(8, 12)]
  assert not any(np.array_equal(a, other) for other in others)


def test_maskers_are_worker_fields_of_a_data_spec():
  spec = DataSpec.single_view(224, worker_fields=(BlockwiseMasker.maskfeat(name="hog_mask"),
                                                  mask_patches.MaskPatchMasker()))
  assert spec.batch_keys == ("image", "hog_mask", "token_mask")


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=0, num_masking_patches=4), "grid=0 must be an integer >= 1"),
    (dict(grid=(4, 4, 4), num_masking_patches=4), r"grid=\(4, 4, 4\) must be one int"),
    (dict(grid=4, num_masking_patches=17), "num_masking_patches=17 exceeds the 4x4 grid's 16"),
    (dict(grid=4, num_masking_patches=2.5), "num_masking_patches=2.5 must be an integer"),
    (dict(grid=4, num_masking_patches=4, max_num_patches=0), "max_num_patches=0 must be"),
    (dict(grid=4, num_masking_patches=4, min_aspect=0), "min_aspect=0 must be > 0"),
    (dict(grid=4, num_masking_patches=4, min_aspect=2), "min_aspect=2 must be <= 1 when"),
    (dict(grid=4, num_masking_patches=4, min_aspect=0.5, max_aspect=0.4),
     "max_aspect=0.4 must be >= min_aspect=0.5"),
])
def test_blockwise_bad_settings_are_one_config_error(kwargs, match):
  with pytest.raises(ConfigError, match=match) as info:
    BlockwiseMasker(**kwargs)
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------
# SimMIM: microsoft/SimMIM data/data_simmim.py MaskGenerator, transcribed with the
# permutation made an argument.


def reference_simmim_mask(permutation, input_size, mask_patch_size, model_patch_size, ratio):
  rand_size = input_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  token_count = rand_size**2
  mask_count = int(np.ceil(token_count * ratio))
  mask_idx = permutation[:mask_count]
  mask = np.zeros(token_count, dtype=int)
  mask[mask_idx] = 1
  mask = mask.reshape((rand_size, rand_size))
  return mask.repeat(scale, axis=0).repeat(scale, axis=1)


SIMMIM_SETTINGS = [  # (input_size, mask_patch_size, model_patch_size, ratio)
    (224, 32, 16, 0.6),  # ViT-B: 30 of 7x7, repeated 2x2
    (192, 32, 4, 0.6),   # Swin-B: 22 of 6x6, repeated 8x8
    (160, 32, 32, 0.28),  # 25 * 0.28 = 7.000000000000001: ceil gives 8
]


@pytest.mark.parametrize("setting", SIMMIM_SETTINGS)
def test_simmim_device_and_worker_masks_equal_the_reference(setting):
  input_size, mask_patch_size, model_patch_size, ratio = setting
  worker = mask_patches.MaskPatchMasker(*setting)
  g, scale = worker.grid, worker.scale
  seeds = range(16)
  permutations = np.stack([np.random.default_rng(s).permutation(g * g) for s in seeds])
  noise = np.argsort(permutations, axis=1).astype(np.float32)  # argsort(noise) == permutation
  device = jax.jit(functools.partial(mask_patches.mask_patches_from_noise, mask_ratio=ratio,
                                     scale=scale))(noise)
  assert device.shape == (len(seeds), g * scale, g * scale) and device.dtype == np.float32
  for i, seed in enumerate(seeds):
    want = reference_simmim_mask(permutations[i], *setting)
    np.testing.assert_array_equal(device[i], want)
    got = worker.make(np.random.default_rng(seed))  # draws the same permutation
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want.astype(bool))
  assert worker.count == {0.6: {7: 30, 6: 22}, 0.28: {5: 8}}[ratio][g]
  np.testing.assert_array_equal(np.asarray(device).sum((1, 2)), worker.count * scale**2)


def test_simmim_upsampling_is_a_block_per_mask_patch():
  coarse = np.random.default_rng(0).integers(0, 2, size=(2, 3, 3)).astype(np.float32)
  up = np.asarray(jax.jit(lambda x: mask_patches.upsample(x, 4))(coarse))
  for i in range(12):
    for j in range(12):
      assert np.all(up[:, i, j] == coarse[:, i // 4, j // 4])
  np.testing.assert_array_equal(mask_patches.upsample(coarse, 4), up)


def test_simmim_random_masks_follow_the_key():
  draw = jax.jit(functools.partial(mask_patches.random_mask_patches, batch=4, grid=7,
                                   mask_ratio=0.6, scale=2))
  a, b, c = draw(jax.random.PRNGKey(0)), draw(jax.random.PRNGKey(0)), draw(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (4, 14, 14) and np.all(np.asarray(a).sum((1, 2)) == 30 * 4)


@pytest.mark.parametrize("make, match", [
    (lambda: mask_patches.MaskPatchMasker(input_size=200), "mask_patch_size=32 must divide"),
    (lambda: mask_patches.MaskPatchMasker(model_patch_size=12), "model_patch_size=12 must"),
    (lambda: mask_patches.MaskPatchMasker(mask_ratio=1.0), "mask_ratio=1.0 must be in"),
    (lambda: mask_patches.MaskPatchMasker(input_size=0), "input_size=0 must be an integer"),
    (lambda: mask_patches.mask_patches_from_noise(np.zeros((2, 8)), mask_ratio=0.5, scale=2),
     "square mask-patch grid, got 8 values"),
    (lambda: mask_patches.mask_patches_from_noise(np.zeros((2, 9)), mask_ratio=0.5, scale=0),
     "scale=0 must be"),
])
def test_simmim_bad_settings_are_one_config_error(make, match):
  with pytest.raises(ConfigError, match=match) as info:
    make()
  assert "\n" not in str(info.value)
