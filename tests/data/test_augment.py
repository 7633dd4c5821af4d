"""Tests of mim_jax.data.augment (RandAugment, colour jitter) against timm / torchvision.

timm and torchvision are independent references here (importorskip); the data
pipeline itself never imports them (checked in a subprocess).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim_jax.data import augment, pipeline, transforms
from mim_jax.data.sources import DataError

MAGNITUDES = (0.0, 1.0, 2.5, 5.0, 7.3, 9.0, 9.99, 10.0)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
  """A non-square crop of a real colour photograph (width 80, height 60)."""
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
  return Image.fromarray(skimage_data.astronaut()[100:160, 150:230])


@pytest.fixture(scope="module")
def timm_aa():
  pytest.importorskip("timm")
  import timm.data.auto_augment as auto_augment  # pylint: disable=import-outside-toplevel
  return auto_augment


def _timm_train_transform(**kwargs):
  """timm's training transforms, through create_transform as MAE calls it.

  timm 1.0.31's create_transform does not pass force_color_jitter on, so that
  flag goes to transforms_imagenet_train (which create_transform calls).
  """
  # pylint: disable=import-outside-toplevel
  from timm.data import create_transform
  from timm.data.transforms_factory import transforms_imagenet_train
  if kwargs.pop("force_color_jitter", False):
    return transforms_imagenet_train(48, interpolation="bicubic", force_color_jitter=True,
                                     **kwargs).transforms
  return create_transform(48, is_training=True, interpolation="bicubic", **kwargs).transforms


def _timm_rand_augment(timm_aa, config_str: str = "rand-m9-mstd0.5-inc1"):
  """timm's RandAugment as MAE's fine-tuning builds it (create_transform's hparams)."""
  found = [t for t in _timm_train_transform(auto_augment=config_str, color_jitter=0.3)
           if isinstance(t, timm_aa.RandAugment)]
  assert len(found) == 1
  return found[0]


def _fixed_hparams(timm_aa) -> dict:
  """create_transform's RandAugment hparams, without magnitude noise."""
  hparams = dict(_timm_rand_augment(timm_aa).ops[0].hparams)
  hparams.pop("magnitude_std")
  return hparams


def _timm_op(timm_aa, call: augment.OpCall, monkeypatch: pytest.MonkeyPatch) -> callable:
  """timm's AugmentOp (prob 1, fixed magnitude) whose random sign is forced to `call.negate`."""
  op = timm_aa.AugmentOp(call.name, prob=1.0, magnitude=call.magnitude,
                         hparams=_fixed_hparams(timm_aa))

  def apply(image: Image.Image) -> Image.Image:
    with monkeypatch.context() as patch:
      # timm's _randomly_negate: `-v if random.random() > 0.5 else v`.
      patch.setattr(timm_aa.random, "random", lambda: 0.9 if call.negate else 0.1)
      return op(image)

  return apply


# --------------------------------------------------------------------------- #
# The ops, one by one, pixel for pixel
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", augment.RAND_INCREASING_OPS)
def test_each_op_equals_timms(name: str, photo: Image.Image, timm_aa,
                              monkeypatch: pytest.MonkeyPatch):
  compared = 0
  for magnitude in MAGNITUDES:
    for negate in (False, True):
      call = augment.OpCall(name, magnitude, negate)
      ours = np.asarray(augment.apply_op(photo, call))
      assert ours.shape == (60, 80, 3) and ours.dtype == np.uint8
      if name == "PosterizeIncreasing" and magnitude == 10.0:
        continue  # 0 bits: timm + Pillow 13 raise; checked in the next test.
      np.testing.assert_array_equal(ours, np.asarray(_timm_op(timm_aa, call, monkeypatch)(photo)),
                                    err_msg=f"{call}")
      compared += 1
  assert compared == 2 * len(MAGNITUDES) - 2 * (name == "PosterizeIncreasing")


def test_posterize_at_magnitude_10_keeps_no_bits(photo: Image.Image, timm_aa,
                                                 monkeypatch: pytest.MonkeyPatch):
  call = augment.OpCall("PosterizeIncreasing", 10.0)
  assert augment.op_argument(call.name, call.magnitude) == 0
  # What Pillow's posterize gave for 0 bits before it refused them: every bit masked.
  assert not np.asarray(augment.apply_op(photo, call)).any()
  try:
    reference = _timm_op(timm_aa, call, monkeypatch)(photo)
  except ValueError:
    return  # Pillow >= the version that refuses bits=0 (13.0 here).
  np.testing.assert_array_equal(np.asarray(augment.apply_op(photo, call)), np.asarray(reference))


def test_ops_change_the_image_as_the_magnitude_grows(photo: Image.Image):
  pixels = np.asarray(photo).astype(int)
  for name in augment.RAND_INCREASING_OPS:
    changes = [np.abs(np.asarray(augment.apply_op(photo, augment.OpCall(name, m))) - pixels).mean()
               for m in (0.0, 5.0, 10.0)]
    if name in ("AutoContrast", "Equalize", "Invert"):
      assert changes[0] == changes[1] == changes[2], name  # No magnitude.
    else:
      assert changes[0] < changes[1] < changes[2], (name, changes)  # 'Increasing' variants.


def test_signed_ops_are_timms(timm_aa):
  hparams = _fixed_hparams(timm_aa)
  random.seed(0)
  for name in augment.RAND_INCREASING_OPS:
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    if level_fn is None:
      assert not augment.is_signed(name) and augment.op_argument(name, 7.0) is None
      continue
    arguments = {level_fn(7.0, hparams)[0] for _ in range(40)}  # Two values iff a random sign.
    assert augment.is_signed(name) == (len(arguments) == 2), name
    ours = {augment.op_argument(name, 7.0, negate) for negate in (False, True)}
    assert ours == arguments, name


# --------------------------------------------------------------------------- #
# The policy: op list, probabilities, magnitude sampling, composition
# --------------------------------------------------------------------------- #


def test_policy_matches_timms_create_transform(timm_aa):
  timm_ra = _timm_rand_augment(timm_aa, "rand-m9-mstd0.5-inc1")
  ours = augment.RandAugment(9, 0.5)
  assert [op.name for op in timm_ra.ops] == list(ours.ops) == list(augment.RAND_INCREASING_OPS)
  assert timm_ra.num_layers == ours.num_ops == 2
  assert timm_ra.choice_weights is None  # Uniform choice, with replacement.
  for op in timm_ra.ops:
    assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (
        ours.prob, ours.magnitude, ours.magnitude_std, None)
    assert op.kwargs == {"fillcolor": augment.FILL, "resample": augment.RESAMPLE}
  # pylint: disable=protected-access
  assert timm_aa._LEVEL_DENOM == augment.MAX_MAGNITUDE
  assert timm_aa._RAND_INCREASING_TRANSFORMS == list(augment.RAND_INCREASING_OPS)


def _timm_magnitudes(timm_aa, magnitude: float, mstd: float, count: int) -> np.ndarray:
  """Magnitudes timm's AugmentOp passes to its level function (its sampling, clipped)."""
  op = timm_aa.AugmentOp("Rotate", prob=1.0, magnitude=magnitude,
                         hparams={**_fixed_hparams(timm_aa), "magnitude_std": mstd})
  seen = []
  op.level_fn = lambda level, hparams: seen.append(level) or (0.0,)
  op.aug_fn = lambda image, *args, **kwargs: image
  random.seed(1)
  for _ in range(count):
    op(None)
  return np.asarray(seen)


@pytest.mark.parametrize("magnitude,mstd", [(9, 0.5), (10, 0.5), (0, 1.0), (5, 3.0), (9, 0.0),
                                            (7, 101.0)])
def test_magnitude_distribution_matches_timm(timm_aa, magnitude: float, mstd: float):
  from scipy import stats  # pylint: disable=import-outside-toplevel

  count = 4000
  theirs = _timm_magnitudes(timm_aa, magnitude, math.inf if mstd > 100 else mstd, count)
  policy = augment.RandAugment(magnitude, mstd)
  rng = np.random.default_rng(0)
  ours = np.array([policy.sample_magnitude(rng) for _ in range(count)])
  assert ours.min() >= 0 and ours.max() <= 10
  if mstd == 0:
    assert (ours == magnitude).all() and (theirs == magnitude).all()
    return
  # The same share clipped at each end, and the same distribution in between.
  for bound in (0.0, 10.0):
    assert abs(np.mean(ours == bound) - np.mean(theirs == bound)) < 0.03
  assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
  if mstd > 100:  # Uniform in [0, m].
    assert ours.max() <= magnitude and abs(ours.mean() - magnitude / 2) < 0.15


def _record_timm_policy(timm_aa, count: int) -> list[list[tuple[str, bool]]]:
  """What timm's RandAugment applies per image: [(op name, negated)], from its own sampling."""
  timm_ra = _timm_rand_augment(timm_aa, "rand-m9-mstd0.5-inc1")
  applied: list[tuple[str, bool]] = []
  for op in timm_ra.ops:
    signed = augment.is_signed(op.name)

    def record(image, *args, name=op.name, signed=signed, **kwargs):
      negated = signed and (args[0] < 1.0 if "Increasing" in name else args[0] < 0)
      applied.append((name, bool(negated)))
      return image

    op.aug_fn = record
  random.seed(2)
  np.random.seed(2)
  plans = []
  for _ in range(count):
    applied.clear()
    timm_ra(None)
    plans.append(list(applied))
  return plans


def _policy_statistics(plans: list[list[tuple[str, bool]]]) -> dict[str, float]:
  counts = Counter(len(plan) for plan in plans)
  pairs = [plan for plan in plans if len(plan) == 2]
  signed = [negated for plan in plans for name, negated in plan if augment.is_signed(name)]
  return {"none": counts[0] / len(plans), "one": counts[1] / len(plans),
          "two": counts[2] / len(plans),
          "same_twice": np.mean([a[0] == b[0] for a, b in pairs]),
          "negated": np.mean(signed)}


def test_op_choice_and_probabilities_match_timm(timm_aa):
  count = 6000
  theirs = _record_timm_policy(timm_aa, count)
  policy = augment.RandAugment(9, 0.5)
  rng = np.random.default_rng(3)
  ours = [[(call.name, call.negate) for call in policy.sample(rng)] for _ in range(count)]
  stats_ours, stats_theirs = _policy_statistics(ours), _policy_statistics(theirs)
  expected = {"none": 0.25, "one": 0.5, "two": 0.25, "same_twice": 1 / 15, "negated": 0.5}
  for key, value in expected.items():
    assert abs(stats_ours[key] - value) < 0.03, (key, stats_ours)
    assert abs(stats_theirs[key] - value) < 0.03, (key, stats_theirs)
  op_counts = Counter(name for plan in ours for name, _ in plan)
  assert set(op_counts) == set(augment.RAND_INCREASING_OPS)
  frequencies = np.array(list(op_counts.values())) / sum(op_counts.values())
  assert np.abs(frequencies - 1 / 15).max() < 0.015


def test_policy_applies_its_sample_with_timms_ops(photo: Image.Image, timm_aa,
                                                  monkeypatch: pytest.MonkeyPatch):
  policy = augment.RandAugment(9, 0.5)
  nontrivial = 0
  for seed in range(12):
    calls = policy.sample(np.random.default_rng(seed))
    expected = photo
    for call in calls:
      expected = _timm_op(timm_aa, call, monkeypatch)(expected)
    ours = policy(photo, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    nontrivial += len(calls) > 0
  assert nontrivial >= 6


def test_policy_is_deterministic_given_the_generator(photo: Image.Image):
  policy = augment.RandAugment(9, 0.5)
  first = [np.asarray(policy(photo, np.random.default_rng(seed))) for seed in range(8)]
  again = [np.asarray(policy(photo, np.random.default_rng(seed))) for seed in range(8)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert len({a.tobytes() for a in first}) >= 5


# --------------------------------------------------------------------------- #
# Colour jitter and timm's rule for it
# --------------------------------------------------------------------------- #


def test_colour_jitter_equals_torchvision(photo: Image.Image):
  pytest.importorskip("torchvision")
  from torchvision.transforms import functional as tvf  # pylint: disable=import-outside-toplevel

  adjust = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  jitter = augment.ColorJitter(0.3, 0.3, 0.3)
  for seed in range(6):
    order, factors = jitter.sample(np.random.default_rng(seed))
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert all(0.7 <= f <= 1.3 for f in factors)
    expected = photo
    for index in order:
      if index < 3:
        expected = adjust[index](expected, factors[index])
    ours = jitter(photo, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


def test_colour_jitter_factor_ranges():
  rng = np.random.default_rng(0)
  factors = np.array([augment.ColorJitter(0.3, 1.5, 0.0).sample(rng)[1][:2]
                      for _ in range(2000)])
  assert 0.7 <= factors[:, 0].min() < 0.72 and 1.28 < factors[:, 0].max() <= 1.3
  assert 0.0 <= factors[:, 1].min() < 0.05 and 2.4 < factors[:, 1].max() <= 2.5  # max(0, 1 - v).
  assert augment.ColorJitter(0.3, 0.3, 0.0).sample(rng)[1][2] is None  # 0 = off, as torchvision.


def _config(**overrides):
  config = pipeline.default_data_config()
  config.update(overrides)
  return config


def test_colour_jitter_is_off_under_randaugment_as_in_timm(timm_aa):
  timm_kinds = {
      "randaug": [type(t).__name__ for t in _timm_train_transform(
          auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3)],
      "forced": [type(t).__name__ for t in _timm_train_transform(
          auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, force_color_jitter=True)],
      "jitter only": [type(t).__name__ for t in _timm_train_transform(color_jitter=0.3)],
  }
  assert "ColorJitter" not in timm_kinds["randaug"]
  assert timm_kinds["forced"].index("RandAugment") < timm_kinds["forced"].index("ColorJitter")
  assert "ColorJitter" in timm_kinds["jitter only"]
  ours = {
      "randaug": pipeline.train_augmentation(_config(randaug_magnitude=9.0, randaug_mstd=0.5,
                                                     color_jitter=0.3)),
      "forced": pipeline.train_augmentation(_config(randaug_magnitude=9.0, randaug_mstd=0.5,
                                                    color_jitter=0.3, force_color_jitter=True)),
      "jitter only": pipeline.train_augmentation(_config(color_jitter=0.3)),
  }
  assert ours["randaug"].color_jitter is None and ours["randaug"].rand_augment is not None
  assert ours["forced"].color_jitter == augment.ColorJitter(0.3, 0.3, 0.3)
  assert ours["jitter only"].rand_augment is None
  assert ours["jitter only"].color_jitter == augment.ColorJitter(0.3, 0.3, 0.3)


# --------------------------------------------------------------------------- #
# The grain step and its config
# --------------------------------------------------------------------------- #


def test_augment_step_runs_after_the_crop_on_the_same_generator(photo: Image.Image):
  step = transforms.Augment(augment.RandAugment(9, 0.5), augment.ColorJitter(0.3, 0.3, 0.3))
  pixels = np.asarray(photo)
  out = step.random_map({"image": pixels, "label": np.int32(4)}, np.random.default_rng(5))
  rng = np.random.default_rng(5)
  expected = augment.ColorJitter(0.3, 0.3, 0.3)(augment.RandAugment(9, 0.5)(photo, rng), rng)
  np.testing.assert_array_equal(out["image"], np.asarray(expected))
  assert out["label"] == 4 and out["image"].dtype == np.uint8
  marker = {"image": np.zeros((0, 0, 3), np.uint8), "label": 1, "error": "bad.jpg: broken"}
  assert step.random_map(marker, np.random.default_rng(0)) is marker
  assert pickle.loads(pickle.dumps(step)) == step  # Travels to grain workers.


@pytest.mark.parametrize("overrides,match", [
    ({"randaug_magnitude": 11.0}, "randaug_magnitude"),
    ({"randaug_magnitude": -1.0}, "randaug_magnitude"),
    ({"randaug_mstd": -0.5}, "randaug_mstd"),
    ({"randaug_mstd": math.nan}, "randaug_mstd"),
    ({"randaug_num_ops": 0}, "randaug_num_ops"),
    ({"color_jitter": -0.1}, "color_jitter"),
])
def test_bad_augmentation_settings_raise(overrides, match):
  with pytest.raises(DataError, match=match) as info:
    pipeline.train_augmentation(_config(**overrides))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,match", [
    ({"randaug_magnitude": "9"}, "randaug_magnitude"),
    ({"randaug_num_ops": 1.5}, "randaug_num_ops"),
    ({"randaug_num_ops": True}, "randaug_num_ops"),
    ({"force_color_jitter": "yes"}, "force_color_jitter"),
])
def test_mistyped_augmentation_settings_raise(overrides, match):
  config = {**pipeline.default_data_config().to_dict(), **overrides}  # Plain dict: no type check.
  with pytest.raises(DataError, match=match):
    pipeline.train_augmentation(config)


def test_default_config_has_no_augmentation():
  assert pipeline.train_augmentation(pipeline.default_data_config()) is None
  assert pipeline.train_augmentation({"kind": "demo"}) is None  # Partial configs: defaults.
  assert dataclasses.asdict(pipeline.train_augmentation(_config(randaug_magnitude=10.0)))[
      "rand_augment"]["magnitude_std"] == 0.0


# --------------------------------------------------------------------------- #
# Evaluation transform = MAE's fine-tuning eval; no torch in the pipeline
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size,crop_pct,shape", [(64, 0.875, (60, 80)), (32, 0.875, (300, 200)),
                                                 (224, 224 / 256, (375, 500)),
                                                 (48, 1.0, (50, 48))])
def test_eval_transform_equals_maes(size: int, crop_pct: float, shape: tuple[int, int]):
  pytest.importorskip("torchvision")
  import io  # pylint: disable=import-outside-toplevel

  from torchvision import transforms as tvt  # pylint: disable=import-outside-toplevel

  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
  image = Image.fromarray(skimage_data.chelsea()).resize(shape[::-1], Image.Resampling.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  # MAE's util/datasets.py build_transform(is_train=False).
  reference = tvt.Compose([tvt.Resize(int(size / crop_pct),
                                      interpolation=tvt.InterpolationMode.BICUBIC),
                           tvt.CenterCrop(size)])(image)
  ours = transforms.DecodeCenterCrop(size, crop_pct).map({"image": buffer.getvalue(), "label": 0})
  np.testing.assert_array_equal(ours["image"], np.asarray(reference))


_NO_TORCH_SCRIPT = """
import sys
import numpy as np
from mim_jax.data import augment, pipeline, sources, transforms
config = pipeline.default_data_config()
config.update(randaug_magnitude=9.0, randaug_mstd=0.5, color_jitter=0.3, force_color_jitter=True)
step = pipeline.train_augmentation(config)
step.random_map({"image": np.full((16, 16, 3), 90, np.uint8), "label": 0}, np.random.default_rng(0))
leaked = sorted(m for m in ("torch", "timm", "torchvision", "tensorflow") if m in sys.modules)
assert not leaked, leaked
"""


def test_pipeline_never_imports_torch():
  repo_root = Path(pipeline.__file__).parents[2]
  result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT], cwd=repo_root,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]  # the script asserts nothing leaked
