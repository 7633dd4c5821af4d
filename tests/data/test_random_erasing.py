"""Tests of mim_jax.data.random_erasing against timm's RandomErasing (the reference).

timm's `_erase` draws from Python's `random`; here it replays the numbers our
sampler drew from numpy's generator (same calls, same order, same arguments),
and its `_get_pixels` returns our fill, so the erased images must be equal bit
for bit.
"""

from __future__ import annotations

import collections
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.data import random_erasing
from mim_jax.data.random_erasing import EraseBox, erase
from mim_jax.errors import ConfigError


class Recorder:
  """A numpy Generator that logs each draw as the Python `random` call timm makes."""

  def __init__(self, seed: int):
    self._rng = np.random.default_rng(seed)
    self.calls: list[tuple[str, tuple, float | int]] = []

  def random(self) -> float:
    value = self._rng.random()
    self.calls.append(("random", (), value))
    return value

  def uniform(self, low: float, high: float) -> float:
    value = self._rng.uniform(low, high)
    self.calls.append(("uniform", (low, high), value))
    return value

  def integers(self, low: int, high: int) -> int:
    value = self._rng.integers(low, high)
    self.calls.append(("randint", (low, high - 1), value))  # randint's end is inclusive
    return value


class Replay:
  """Stands in for timm's module-level `random`: returns the recorded draws, in order."""

  def __init__(self, calls: list[tuple[str, tuple, float | int]]):
    self._calls = collections.deque(calls)

  def _next(self, kind: str, args: tuple) -> float | int:
    assert self._calls, f"timm drew {kind}{args} after our sampler had stopped"
    recorded_kind, recorded_args, value = self._calls.popleft()
    assert (recorded_kind, recorded_args) == (kind, args), (
        f"timm drew {kind}{args} where our sampler drew {recorded_kind}{recorded_args}")
    return value

  def random(self) -> float:
    return self._next("random", ())

  def uniform(self, low: float, high: float) -> float:
    return self._next("uniform", (low, high))

  def randint(self, low: int, high: int) -> int:
    return self._next("randint", (low, high))

  @property
  def left(self) -> int:
    return len(self._calls)


@pytest.fixture(scope="module")
def timm_re():
  pytest.importorskip("timm")
  import timm.data.random_erasing as module  # pylint: disable=import-outside-toplevel
  return module


# One compilation per image shape and mode (eager jnp would compile every op).
erase_jit = jax.jit(erase, static_argnames="mode")


def _fill(mode: str, shape: tuple[int, ...], key: jax.Array) -> np.ndarray:
  """What `erase` fills with under `key`: erase every pixel (the fill depends on key only)."""
  full = np.tile(np.array([[0, 0, shape[1], shape[2]]], np.int32), (shape[0], 1))
  return np.asarray(erase_jit(np.zeros(shape, np.float32), full, key, mode=mode))


def _attempts(calls) -> int:
  return sum(kind == "uniform" for kind, _, _ in calls) // 2


# (height, width), seeds, probability, fill mode. Small and thin images make attempts
# fail (h >= H or w >= W), and 1x1 ones yield empty (h = 0) boxes, as in timm. One
# compilation of `erase` per image batch shape and mode.
CASES = [((224, 224), 24, 0.25, "pixel"), ((224, 224), 24, 1.0, "pixel"),
         ((32, 32), 100, 1.0, "pixel"), ((7, 5), 100, 1.0, "pixel"),
         ((3, 40), 100, 1.0, "pixel"), ((1, 1), 60, 0.25, "pixel"),
         ((32, 32), 60, 1.0, "rand"), ((32, 32), 60, 1.0, "const")]


@pytest.mark.parametrize("size,seeds,probability,mode", CASES)
def test_erasing_equals_timm(timm_re, monkeypatch, size, seeds, probability, mode):
  import torch  # pylint: disable=import-outside-toplevel
  field = EraseBox(size, probability=probability)
  recorders = [Recorder(seed) for seed in range(seeds)]
  boxes = np.stack([field.make(rec) for rec in recorders])
  assert boxes.dtype == np.int32 and boxes.shape == (seeds, 4)
  images = np.random.default_rng(0).standard_normal((seeds, *size, 3)).astype(np.float32)
  # Any key type works; 'rbg' compiles in a fraction of threefry's time on the CPU.
  key = jax.random.key(1, impl="rbg")
  ours = np.asarray(erase_jit(images, boxes, key, mode=mode))
  fill = _fill(mode, images.shape, key)

  reference = timm_re.RandomErasing(probability=probability, mode=mode, max_count=1,
                                    device="cpu")
  for i, rec in enumerate(recorders):
    top, left, box_h, box_w = boxes[i].tolist()

    def our_pixels(per_pixel, rand_color, patch_size, dtype, device, i=i, top=top, left=left):
      del rand_color, device
      assert tuple(patch_size) == (3, box_h, box_w)
      if per_pixel:
        patch = fill[i, top:top + box_h, left:left + box_w]
      else:
        patch = fill[i, :1, :1]
      return torch.from_numpy(patch.transpose(2, 0, 1).copy()).to(dtype)

    replay = Replay(rec.calls)
    monkeypatch.setattr(timm_re, "random", replay)
    if mode != "const":
      monkeypatch.setattr(timm_re, "_get_pixels", our_pixels)
    image = torch.from_numpy(images[i].transpose(2, 0, 1).copy())
    expected = reference(image).numpy().transpose(1, 2, 0)
    assert replay.left == 0, "our sampler drew more numbers than timm"
    np.testing.assert_array_equal(ours[i], expected, err_msg=f"seed {i}, box {boxes[i]}")


def test_cases_cover_every_outcome():
  """The sizes above do reach each branch of timm's sampler."""
  outcomes = collections.Counter()
  for size, seeds, probability, _ in CASES:
    field = EraseBox(size, probability=probability)
    for seed in range(seeds):
      rec = Recorder(seed)
      top, left, box_h, box_w = field.make(rec).tolist()
      attempts = _attempts(rec.calls)
      if attempts == 0:
        outcomes["not drawn"] += 1
      elif not any(kind == "randint" for kind, _, _ in rec.calls):
        assert attempts == random_erasing.ATTEMPTS and (top, left, box_h, box_w) == (0, 0, 0, 0)
        outcomes["10 failed attempts"] += 1
      else:
        outcomes["empty box" if box_h * box_w == 0 else
                 "first attempt" if attempts == 1 else "after failed attempts"] += 1
  assert set(outcomes) == {"not drawn", "10 failed attempts", "empty box", "first attempt",
                           "after failed attempts"}, outcomes


def test_erase_probability_and_box_statistics():
  """Over many images, 25% are erased (224 px: an attempt practically always fits), with
  the erased fraction of the area uniform in (0.02, 1/3) before rounding."""
  field = EraseBox(224)
  rng = np.random.default_rng(0)
  boxes = np.stack([field.make(rng) for _ in range(20000)])
  erased = boxes[:, 2] * boxes[:, 3] > 0
  assert abs(erased.mean() - 0.25) < 0.015  # binomial std 0.003
  fraction = boxes[erased, 2] * boxes[erased, 3] / 224**2
  assert fraction.min() > 0.015 and fraction.max() < 0.35
  # Attempts that do not fit are mostly large ones, so the kept mean is below 0.177.
  assert 0.15 < fraction.mean() < 0.177
  assert np.all(boxes[erased, 0] + boxes[erased, 2] <= 224)
  assert np.all(boxes[erased, 1] + boxes[erased, 3] <= 224)


def test_box_field_pickles_and_is_deterministic():
  field = EraseBox((48, 64), probability=1.0, name="box")
  clone = pickle.loads(pickle.dumps(field))
  assert clone == field and clone.name == "box" and clone.shape == (48, 64)
  first = [field.make(np.random.default_rng(seed)) for seed in range(20)]
  again = [clone.make(np.random.default_rng(seed)) for seed in range(20)]
  np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_erase_keeps_dtype_and_pixels_outside_the_box():
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.bfloat16)
  boxes = jnp.asarray([[1, 2, 3, 4], [0, 0, 0, 0]], jnp.int32)
  out = erase_jit(images, boxes, jax.random.key(0, impl="rbg"))
  assert out.dtype == jnp.bfloat16
  mask = np.zeros((2, 8, 8), bool)
  mask[0, 1:4, 2:6] = True
  np.testing.assert_array_equal(np.asarray(out)[~mask], np.asarray(images)[~mask])
  assert np.all(np.asarray(out)[mask] != np.asarray(images)[mask])


@pytest.mark.parametrize("kwargs,message", [
    (dict(size=32, probability=1.5), "probability 1.5 is not in [0, 1]"),
    (dict(size=32, min_area=0.5, max_area=0.1), "area range (0.5, 0.1)"),
    (dict(size=0), "positive image size, got 0"),
    (dict(size=32, min_aspect=2.0, max_aspect=1.0), "aspect range (2.0, 1.0)"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
  with pytest.raises(ConfigError) as error:
    EraseBox(**kwargs)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_mode_is_a_one_line_error():
  with pytest.raises(ConfigError, match=r"mode 'pix' is unknown; choose from"):
    erase(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4), jnp.int32), jax.random.PRNGKey(0), "pix")
