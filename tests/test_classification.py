"""Fine-tuning objectives: smoothed one-hots, soft cross entropy, Mixup / CutMix, top-k.

References are numpy closed forms and, where torch + timm import, timm's own
`Mixup`, `rand_bbox`, `mixup_target` and `SoftTargetCrossEntropy` fed the same
random draws.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.errors import ConfigError
from mim_jax.objectives import classification as cls


def np_one_hot(labels, num_classes, smoothing):
  off = smoothing / num_classes
  out = np.full((len(labels), num_classes), off)
  out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return out


def distinct_images(batch=4, size=16, channels=3, seed=0):
  """Row i is a random image; values never coincide across rows."""
  rng = np.random.RandomState(seed)
  return rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)


# -- smoothed one-hot and soft cross entropy -------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_one_hot_smoothed_values(smoothing):
  labels = np.array([0, 3, 9, 3])
  got = np.asarray(cls.one_hot_smoothed(jnp.asarray(labels), 10, smoothing))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np_one_hot(labels, 10, smoothing), rtol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  if smoothing == 0.1:  # the literal values: off = 0.01, on = 0.91
    assert np.isclose(got[0, 0], 0.91) and np.isclose(got[0, 1], 0.01)


def test_one_hot_smoothed_matches_timm():
  torch = pytest.importorskip("torch")
  mixup = pytest.importorskip("timm.data.mixup")
  labels = np.array([1, 4, 0, 4, 2, 7])
  want = mixup.mixup_target(torch.tensor(labels), 8, lam=1.0, smoothing=0.2).numpy()
  np.testing.assert_allclose(cls.one_hot_smoothed(jnp.asarray(labels), 8, 0.2), want, rtol=1e-6)


def np_log_softmax(x):
  x = x.astype(np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_soft_cross_entropy_against_numpy():
  rng = np.random.RandomState(0)
  logits = rng.normal(0, 3, (6, 11)).astype(np.float32)
  targets = rng.dirichlet(np.ones(11), size=6).astype(np.float32)
  want = np.mean(np.sum(-targets * np_log_softmax(logits), -1))
  got = cls.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # bf16 logits are computed in float32 (no overflow / precision loss in log_softmax).
  big = jnp.asarray(logits * 1000, jnp.bfloat16)
  want_big = np.mean(np.sum(-targets * np_log_softmax(np.asarray(big, np.float32)), -1))
  np.testing.assert_allclose(float(cls.soft_cross_entropy(big, jnp.asarray(targets))), want_big,
                             rtol=1e-5)


def test_soft_cross_entropy_matches_timm():
  torch = pytest.importorskip("torch")
  loss_mod = pytest.importorskip("timm.loss")
  rng = np.random.RandomState(1)
  logits = rng.normal(0, 2, (5, 7)).astype(np.float32)
  targets = rng.dirichlet(np.ones(7), size=5).astype(np.float32)
  want = loss_mod.SoftTargetCrossEntropy()(torch.tensor(logits), torch.tensor(targets)).item()
  np.testing.assert_allclose(float(cls.soft_cross_entropy(logits, targets)), want, rtol=1e-6)


# -- Mixup / CutMix ---------------------------------------------------------------------
# Beta sampling takes seconds to compile, so `draw_mix` is compiled for one config
# (BOTH) and its draws are shared; the mixing itself is also checked on chosen draws
# (every branch, clipped boxes, lam at its ends) and cutmix_minmax on real boxes.

SIZE = 16
BOTH = cls.MixupConfig(num_classes=10, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6,
                       switch_prob=0.3, label_smoothing=0.1)
MINMAX = cls.MixupConfig(num_classes=10, mixup_alpha=0.0, cutmix_minmax=(0.3, 0.9))
MIXUP = cls.MixupConfig(num_classes=10, mixup_alpha=0.2, label_smoothing=0.1)
CUTMIX = cls.MixupConfig(num_classes=10, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)

draw_one = jax.jit(cls.draw_mix, static_argnums=(1, 2, 3))
draw_box = jax.jit(cls.draw_box, static_argnums=(1, 2, 3))
apply_many = jax.jit(jax.vmap(cls.mix_from_draws, in_axes=(None, None, 0, None)),
                     static_argnums=3)


@functools.lru_cache(maxsize=None)
def real_draws(config, count):
  """`draw_mix` for `count` keys, stacked (a loop: vmapping Beta compiles twice as long)."""
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), count))
  draws = [draw_one(key, config, SIZE, SIZE) for key in keys]
  return cls.MixDraws(*(np.stack(field) for field in zip(*draws)))


def chosen_draws(lam_mixup=(), lam_cutmix=(), boxes=(), u_apply=0.0, u_switch=0.0):
  """MixDraws stacked over samples, from explicit values (the unused fields are 1 / 0)."""
  count = max(len(lam_mixup), len(lam_cutmix), len(boxes))
  full = lambda values, fill: np.asarray(values if len(values) else [fill] * count)
  return cls.MixDraws(jnp.full(count, u_apply, jnp.float32), jnp.full(count, u_switch, jnp.float32),
                      jnp.asarray(full(lam_mixup, 1.0), jnp.float32),
                      jnp.asarray(full(lam_cutmix, 1.0), jnp.float32),
                      jnp.asarray(full(boxes, (0, 0, 0, 0)), jnp.int32))


def take(draws, i):
  return cls.MixDraws(*(np.asarray(field)[i] for field in draws))


LABELS = np.array([3, 1, 4, 1, 5, 9])


def test_no_mix_returns_inputs_unchanged():
  images = distinct_images(batch=6, size=SIZE)
  off = cls.MixupConfig(num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
  assert not off.enabled
  outputs = [cls.mixup_cutmix(jax.random.PRNGKey(0), jnp.asarray(images), jnp.asarray(LABELS), off)]
  draws = real_draws(BOTH, 1000)
  unmixed = np.nonzero(np.asarray(draws.u_apply) >= BOTH.prob)[0][:4]  # the prob draw says no
  assert len(unmixed) == 4
  mixed, targets, lam = apply_many(jnp.asarray(images), jnp.asarray(LABELS),
                                   take(draws, unmixed), BOTH)
  outputs += list(zip(mixed, targets, lam))
  for mixed, targets, lam in outputs:
    np.testing.assert_array_equal(mixed, images)
    assert float(lam) == 1.0
    np.testing.assert_allclose(targets, np_one_hot(LABELS, 10, 0.1), rtol=1e-6)


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
  images = distinct_images(batch=6, size=SIZE)
  lams = [0.0, 0.13, 0.5, 0.97]
  mixed, targets, lam = apply_many(jnp.asarray(images), jnp.asarray(LABELS),
                                   chosen_draws(lam_mixup=lams), MIXUP)
  np.testing.assert_allclose(lam, lams, rtol=1e-7)
  one_hot = np_one_hot(LABELS, 10, 0.1)
  for i, lam_i in enumerate(lams):
    np.testing.assert_allclose(mixed[i], lam_i * images + (1 - lam_i) * images[::-1], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(targets[i], lam_i * one_hot + (1 - lam_i) * one_hot[::-1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets[i]).sum(-1), 1.0, rtol=1e-6)


CUT_LAMS = [0.0, 0.1, 0.37, 0.5, 0.8, 0.995]
CENTRES = [(0, 0), (5, 9), (8, 8), (15, 2), (15, 15)]
MINMAX_BOXES = [(4, 4, 0, 0), (7, 12, 3, 4), (14, 5, 2, 11), (5, 14, 11, 2), (14, 14, 2, 2)]


@pytest.mark.parametrize("config", [CUTMIX, MINMAX], ids=["rand_bbox", "minmax"])
def test_cutmix_pixel_fraction_equals_one_minus_lam(config):
  batch = 4
  images = np.broadcast_to(np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None],
                           (batch, SIZE, SIZE, 3)).copy()
  labels = np.array([0, 1, 2, 3])
  if config is CUTMIX:
    cases = [(lam, cy, cx) for lam in CUT_LAMS for cy, cx in CENTRES]
    draws = chosen_draws(lam_cutmix=[lam for lam, _, _ in cases],
                         boxes=[(cy, cx, 0, 0) for _, cy, cx in cases])
  else:
    draws = chosen_draws(lam_cutmix=[0.5] * len(MINMAX_BOXES), boxes=MINMAX_BOXES)
  mixed, targets, lam = map(np.asarray, apply_many(jnp.asarray(images), jnp.asarray(labels[:batch]),
                                                   draws, config))
  one_hot = np_one_hot(labels, 10, config.label_smoothing)
  clipped = 0
  for i in range(len(lam)):
    from_flip = mixed[i] == images[::-1]
    assert np.all(from_flip ^ (mixed[i] == images))  # every pixel is one or the other
    box = from_flip[0, :, :, 0]
    assert np.all(from_flip == box[None, :, :, None])  # one rectangle, all rows and channels
    rows, cols = np.nonzero(box)
    if rows.size:
      assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    if config is CUTMIX:
      side = int(SIZE * np.sqrt(1 - CUT_LAMS[i // len(CENTRES)]))
      assert rows.size == 0 or max(np.ptp(rows), np.ptp(cols)) + 1 <= side
      clipped += rows.size and box.sum() < side * side
    else:
      cut_h, cut_w, top, left = MINMAX_BOXES[i]
      assert box.sum() == cut_h * cut_w
      assert box[top, left] and box[top + cut_h - 1, left + cut_w - 1]
    assert box.mean() == pytest.approx(1 - lam[i], abs=1e-7)  # lam corrected to the box
    want = lam[i] * one_hot + (1 - lam[i]) * one_hot[::-1]
    np.testing.assert_allclose(targets[i], want, atol=1e-6)
    np.testing.assert_allclose(targets[i].sum(-1), 1.0, rtol=1e-6)
  assert config is MINMAX or clipped >= 5


def test_rand_bbox_matches_timm(monkeypatch):
  pytest.importorskip("torch")
  mixup = pytest.importorskip("timm.data.mixup")
  for height, width in [(16, 16), (12, 20)]:
    for lam in [0.0, 0.05, 0.3, 0.5, 0.77, 0.99, 1.0]:
      for cy, cx in [(0, 0), (3, 7), (height - 1, width - 1), (height // 2, 1)]:
        centres = iter([cy, cx])
        fake_random = types.SimpleNamespace(randint=lambda low, high, size=None: next(centres))
        monkeypatch.setattr(mixup, "np", types.SimpleNamespace(random=fake_random, sqrt=np.sqrt,
                                                               clip=np.clip))
        want = mixup.rand_bbox((3, height, width), float(np.float32(lam)))
        got = cls.rand_bbox(height, width, jnp.float32(lam), jnp.int32(cy), jnp.int32(cx))
        assert tuple(int(v) for v in got) == tuple(int(v) for v in want), (lam, cy, cx)


class ReplayRandom:
  """Stands in for `np.random` inside timm's mixup: returns our draws in timm's call order."""

  def __init__(self, draws, config):
    self.draws, self.config = draws, config
    self.uniforms = iter([float(draws.u_apply), float(draws.u_switch)])
    self.ints = iter(np.asarray(draws.box).tolist())

  def rand(self, size=None):
    assert size is None
    return next(self.uniforms)

  def beta(self, a, b, size=None):
    # timm: beta(cutmix_alpha) if (both enabled and rand() < switch_prob) or cutmix only.
    config = self.config
    if config.mixup_enabled and config.cutmix_enabled:
      use_cutmix = float(self.draws.u_switch) < config.switch_prob
    else:
      use_cutmix = config.cutmix_enabled
    assert a == b == (config.cutmix_beta_alpha if use_cutmix else config.mixup_alpha)
    return float(self.draws.lam_cutmix if use_cutmix else self.draws.lam_mixup)

  def randint(self, low, high, size=None):
    value = next(self.ints)
    assert low <= value < high, (low, value, high)  # our draw lies in timm's range
    return value


def replay_cases(name):
  """(config, stacked draws) for the timm comparison: real draws where they compile once."""
  if name == "both":
    return BOTH, take(real_draws(BOTH, 1000), np.arange(16))
  if name == "minmax":
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), 8))
    boxes = [np.asarray(draw_box(key, MINMAX, SIZE, SIZE)) for key in keys]
    # A Beta draw of exactly 1 mixes nothing in timm, even with cutmix_minmax (last case).
    return MINMAX, chosen_draws(lam_cutmix=[0.5] * 7 + [1.0], boxes=boxes)
  if name == "mixup":
    return MIXUP, chosen_draws(lam_mixup=[0.02, 0.4, 0.9])
  return CUTMIX, chosen_draws(lam_cutmix=[0.2, 0.6, 0.9], boxes=[(3, 14, 0, 0), (8, 8, 0, 0),
                                                                 (15, 0, 0, 0)])


@pytest.mark.parametrize("name", ["mixup", "cutmix", "both", "minmax"])
def test_matches_timm_mixup_replaying_the_same_draws(name, monkeypatch):
  torch = pytest.importorskip("torch")
  mixup = pytest.importorskip("timm.data.mixup")
  config, draws = replay_cases(name)
  images = distinct_images(batch=6, size=SIZE, seed=3)
  mixed, targets, lam = map(np.asarray, apply_many(jnp.asarray(images), jnp.asarray(LABELS),
                                                   draws, config))
  kinds = set()
  for i in range(len(lam)):
    fake_np = types.SimpleNamespace(random=ReplayRandom(take(draws, i), config), sqrt=np.sqrt,
                                    clip=np.clip)
    monkeypatch.setattr(mixup, "np", fake_np)
    timm_mixup = mixup.Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                             cutmix_minmax=config.cutmix_minmax, prob=config.prob,
                             switch_prob=config.switch_prob, mode="batch", correct_lam=True,
                             label_smoothing=config.label_smoothing,
                             num_classes=config.num_classes)
    x = torch.tensor(images.transpose(0, 3, 1, 2).copy())
    want_x, want_targets = timm_mixup(x, torch.tensor(LABELS))
    np.testing.assert_allclose(mixed[i], want_x.numpy().transpose(0, 2, 3, 1), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(targets[i], want_targets.numpy(), rtol=1e-6, atol=1e-6)
    blended = not np.all((mixed[i] == images) | (mixed[i] == images[::-1]))
    kinds.add("none" if lam[i] == 1 else "mixup" if blended else "cutmix")
  expected = {"mixup": {"mixup"}, "cutmix": {"cutmix"}, "both": {"none", "mixup", "cutmix"},
              "minmax": {"cutmix", "none"}}
  assert kinds == expected[name]


def test_mixing_frequencies_follow_prob_and_switch_prob():
  images = np.broadcast_to(np.array([0.0, 1.0], np.float32)[:, None, None, None],
                           (2, SIZE, SIZE, 1))
  mixed, _, lam = map(np.asarray, apply_many(jnp.asarray(images), jnp.asarray([0, 1]),
                                             real_draws(BOTH, 1000), BOTH))
  applied = lam < 1
  cut = applied & np.all((mixed == 0) | (mixed == 1), axis=(1, 2, 3, 4))
  blend = applied & ~cut
  # Tolerances are about 4 standard deviations of each estimate over 1000 draws.
  assert abs(applied.mean() - BOTH.prob) < 0.06
  assert abs(cut.sum() / applied.sum() - BOTH.switch_prob) < 0.08
  # Mixup's lam ~ Beta(1, 1) = U(0, 1): mean 1/2, variance 1/12.
  assert abs(lam[blend].mean() - 0.5) < 0.05 and abs(lam[blend].var() - 1 / 12) < 0.015


def test_bad_mixup_inputs_are_config_errors():
  with pytest.raises(ConfigError):
    cls.MixupConfig(num_classes=0)
  with pytest.raises(ConfigError):
    cls.MixupConfig(num_classes=10, prob=1.5)
  with pytest.raises(ConfigError):
    cls.MixupConfig(num_classes=10, label_smoothing=1.0)
  with pytest.raises(ConfigError):
    cls.MixupConfig(num_classes=10, cutmix_minmax=(0.8, 0.2))
  with pytest.raises(ConfigError, match="even"):
    cls.mix_from_draws(jnp.zeros((3, 8, 8, 3)), jnp.zeros(3, jnp.int32),
                       take(chosen_draws(lam_mixup=[0.5]), 0), MIXUP)
  with pytest.raises(ConfigError, match="no box size"):
    cls.draw_box(jax.random.PRNGKey(0), cls.MixupConfig(num_classes=10, cutmix_minmax=(0.3, 0.4)),
                 4, 4)


# -- top-k ------------------------------------------------------------------------------


def np_topk_correct(logits, labels, k):
  order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  return int(np.sum(np.any(order == labels[:, None], axis=-1)))


def test_topk_correct_against_numpy_with_ties():
  rng = np.random.RandomState(0)
  logits = rng.randint(0, 4, (64, 10)).astype(np.float32)  # many ties
  labels = rng.randint(0, 10, 64)
  got = jax.jit(cls.topk_correct, static_argnames="ks")(jnp.asarray(logits), jnp.asarray(labels),
                                                         ks=(1, 3, 5))
  assert set(got) == {"top1", "top3", "top5"}
  for k in (1, 3, 5):
    assert int(got[f"top{k}"]) == np_topk_correct(logits, labels, k), k
  # A fully tied row: the argsort puts class 0 first.
  tie = cls.topk_correct(jnp.zeros((2, 10)), jnp.asarray([0, 1]))
  assert int(tie["top1"]) == 1 and int(tie["top5"]) == 2


def test_topk_correct_valid_mask_and_few_classes():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(12, 3)).astype(np.float32)
  labels = rng.randint(0, 3, 12)
  valid = np.arange(12) < 9
  got = cls.topk_correct(jnp.asarray(logits), jnp.asarray(labels), ks=(1, 5),
                         valid=jnp.asarray(valid))
  assert int(got["top1"]) == np_topk_correct(logits[:9], labels[:9], 1)
  assert int(got["top5"]) == 9  # k above the number of classes: every valid row counts
