"""Analysis tools: CKA against an independent float64 numpy estimator, attention distance
and entropy on attention whose answer is known, and the CLI end to end on tiny models."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl.testing import flagsaver

from conftest import tiny_config
from mim_jax import analyze
from mim_jax.analysis import attention, cka, inputs
from mim_jax.convert import arch_from_config, save_converted
from mim_jax.errors import UserError
from mim_jax.models.vit import VisionTransformer
from mim_jax.tasks.registry import build_task
from mim_jax.trainer.tree import path_str

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------
def numpy_hsic(k, l):
  """Nguyen et al. (2021) eq. 3, written from the formula in float64."""
  n = k.shape[0]
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def numpy_minibatch_cka(batches):
  """batches: [(features_a (La, B, ...), features_b (Lb, B, ...), mask or None)]."""
  first_a, first_b, _ = batches[0]
  cross = np.zeros((len(first_a), len(first_b)))
  self_a, self_b = np.zeros(len(first_a)), np.zeros(len(first_b))
  for features_a, features_b, mask in batches:
    keep = np.ones(features_a.shape[1], bool) if mask is None else np.asarray(mask)
    grams_a = [x[keep].reshape(keep.sum(), -1).astype(np.float64) for x in features_a]
    grams_b = [y[keep].reshape(keep.sum(), -1).astype(np.float64) for y in features_b]
    grams_a, grams_b = [x @ x.T for x in grams_a], [y @ y.T for y in grams_b]
    for i, k in enumerate(grams_a):
      self_a[i] += numpy_hsic(k, k)
      for j, l in enumerate(grams_b):
        cross[i, j] += numpy_hsic(k, l)
    for j, l in enumerate(grams_b):
      self_b[j] += numpy_hsic(l, l)
  return cross / np.sqrt(np.outer(self_a, self_b))


def random_features(rng, batch, layers_a=3, layers_b=2, tokens=5, dim=4):
  """Layers of A and B that share signal (CKA well away from 0 and 1), non-zero mean."""
  base = rng.standard_normal((batch, tokens, dim))
  features_a = np.stack([base * (i + 1) + 0.8 * rng.standard_normal(base.shape) + 2.0
                         for i in range(layers_a)])
  features_b = np.stack([np.tanh(base @ rng.standard_normal((dim, dim + 2)))
                         + 0.5 * rng.standard_normal((batch, tokens, dim + 2)) - 1.0
                         for _ in range(layers_b)])
  return features_a.astype(np.float32), features_b.astype(np.float32)


def test_cka_matches_numpy_over_several_batches_with_padding():
  rng = np.random.default_rng(0)
  batches = [(*random_features(rng, 8), None), (*random_features(rng, 8), None)]
  padded = np.arange(8) < 6  # the last batch has two padding rows of garbage
  batches.append((*random_features(rng, 8), padded))
  expected = numpy_minibatch_cka(batches)
  assert 0.1 < expected.min() and expected.max() < 0.95
  np.testing.assert_allclose(cka.cka_of_features(batches), expected, rtol=2e-4, atol=2e-5)
  # One batch alone is a different number: the accumulation is really over batches.
  assert not np.allclose(numpy_minibatch_cka(batches[:1]), expected, rtol=1e-3)


def test_cka_of_a_representation_with_itself_is_one():
  rng = np.random.default_rng(1)
  features, _ = random_features(rng, 12, layers_a=4)
  result = cka.cka_of_features([(features, features, None)])
  np.testing.assert_allclose(np.diag(result), 1.0, atol=1e-5)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
  rng = np.random.default_rng(2)
  batches = [random_features(rng, 10) for _ in range(2)]
  flat = 5 * 4
  rotation, _ = np.linalg.qr(rng.standard_normal((flat, flat)))

  def transform(features):
    layers, batch = features.shape[:2]
    moved = features.reshape(layers, batch, flat) @ rotation * 7.5
    return moved.reshape(features.shape).astype(np.float32)

  original = cka.cka_of_features([(a, b, None) for a, b in batches])
  moved = cka.cka_of_features([(transform(a), b, None) for a, b in batches])
  np.testing.assert_allclose(moved, original, rtol=1e-4)
  np.testing.assert_allclose(moved, numpy_minibatch_cka([(a, b, None) for a, b in batches]),
                             rtol=2e-4)


def test_cka_rejects_small_batches_token_mismatch_and_unknown_layers():
  rng = np.random.default_rng(3)
  a, b = random_features(rng, 3)
  with pytest.raises(UserError, match=r"n > 3"):
    cka.cka_of_features([(a, b, None)])
  a, _ = random_features(rng, 8, tokens=5)
  _, b = random_features(rng, 8, tokens=9)
  with pytest.raises(UserError, match="token counts differ"):
    cka.cka_of_features([(a, b, None)])
  with pytest.raises(UserError, match=r"0\.\.12"):
    cka.check_layers([0, 13], 12, "model")


# ----------------------------------------------------------------------------
# Attention distance and entropy
# ----------------------------------------------------------------------------
def grid_distance(p, q, grid):
  (r1, c1), (r2, c2) = divmod(p, grid), divmod(q, grid)
  return math.sqrt((r1 - r2)**2 + (c1 - c2)**2)


def test_uniform_attention_has_entropy_log_n_and_the_mean_pairwise_distance():
  grid, patch_size, heads = 4, 8, 3
  num_patches = grid * grid
  logits = np.zeros((2, heads, num_patches + 1, num_patches + 1), np.float32)
  distance, entropy = attention.head_statistics(logits, patch_size)
  np.testing.assert_allclose(entropy, np.full(heads, math.log(num_patches)), rtol=1e-6)
  mean_pair = np.mean([grid_distance(p, q, grid) for p in range(num_patches)
                       for q in range(num_patches)]) * patch_size
  np.testing.assert_allclose(distance, np.full(heads, mean_pair), rtol=1e-5)


def test_one_hot_attention_distance_is_the_grid_distance_in_pixels():
  grid, patch_size = 5, 14
  num_patches = grid * grid
  targets = {0: lambda q: 0, 1: lambda q: q, 2: lambda q: num_patches - 1}  # head -> key patch
  logits = np.random.default_rng(4).standard_normal(
      (2, len(targets), num_patches + 1, num_patches + 1)).astype(np.float32)
  for head, key in targets.items():
    for q in range(num_patches):
      logits[:, head, 1 + q, 1 + key(q)] = 1e4
  distance, entropy = attention.head_statistics(logits, patch_size)
  expected = [np.mean([grid_distance(q, key(q), grid) for q in range(num_patches)]) * patch_size
              for key in targets.values()]
  np.testing.assert_allclose(distance, expected, rtol=1e-5)
  assert expected[1] == 0.0 and expected[0] > 0.0
  np.testing.assert_allclose(entropy, 0.0, atol=1e-5)


def test_cls_row_and_column_are_dropped_before_softmax_and_padding_ignored():
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
  reference = attention.head_statistics(logits[:2], patch_size=16)
  loud = logits.copy()
  loud[:, :, :, 0] = 1e4  # every query would attend only to cls if cls were kept
  loud[:, :, 0, :] = -1e4
  loud[2] = rng.standard_normal(loud[2].shape) * 50  # a padding row of garbage
  got = attention.head_statistics(loud, patch_size=16, mask=np.array([True, True, False]))
  np.testing.assert_allclose(got[0], reference[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], reference[1], rtol=1e-5)


def test_query_attention_map_is_the_query_row_over_patches():
  grid = 3
  logits = np.full((1, 2, 10, 10), -1e4, np.float32)
  logits[0, 0, 1 + 4, 1 + 7] = 0.0  # head 1: patch 4 attends to patch 7 = row 2, column 1
  logits[0, 1, 1 + 4, 1:] = 0.0     # head 2: uniform
  maps = np.asarray(attention.query_attention(logits, 4))
  assert maps.shape == (1, 2, grid, grid)
  expected = np.zeros((grid, grid))
  expected[2, 1] = 1.0
  np.testing.assert_allclose(maps[0, 0], expected, atol=1e-6)
  np.testing.assert_allclose(maps[0, 1], 1.0 / 9, rtol=1e-6)


# ----------------------------------------------------------------------------
# Models and the CLI
# ----------------------------------------------------------------------------
def random_params(init, seed):
  """Params of `init`'s shapes with random values: no eager or compiled init (seconds on CPU)."""
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    base = 1.0 if path_str(path).endswith("scale") else 0.0
    return (base + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(name="models", scope="module")
def models_fixture(tmp_path_factory):
  """Encoders 'a' (3 blocks, 6 heads) and 'mae' (an MAE with its decoder: 2 blocks, 4 heads),
  both 17 tokens at 32 px, and 'patch4' ('a' with 4-px patches: 65 tokens)."""
  root = tmp_path_factory.mktemp("models")
  config = tiny_config()
  mae = str(root / "mae.npz")
  save_converted(mae, random_params(build_task(config).init_params, seed=0),
                 arch_from_config(config.to_dict(), source="test"))
  arch = dict(patch_size=8, image_size=32, width=48, depth=3, num_heads=6, source="test")
  images = np.zeros((1, 32, 32, 3), np.float32)
  paths = {"mae": mae}
  for name, patch_size in (("a", 8), ("patch4", 4)):
    model = VisionTransformer(patch_size=patch_size, width=48, depth=3, num_heads=6)
    params = random_params(lambda key, model=model: model.init(key, images)["params"], seed=1)
    paths[name] = str(root / f"{name}.npz")
    save_converted(paths[name], {"encoder": params}, {**arch, "patch_size": patch_size})
  return paths


def test_model_level_errors(models):
  a, patch4 = inputs.load_model(models["a"]), inputs.load_model(models["patch4"])
  with pytest.raises(UserError, match=r"17 tokens.*65"):
    cka.cka_between(a, patch4, [])
  with pytest.raises(UserError, match=r"layers \[4\].*0\.\.3"):
    cka.cka_between(a, a, [], layers_b=[4])
  with pytest.raises(UserError, match=r"1\.\.3"):
    attention.attention_statistics(a, [], layers=[0])
  with pytest.raises(UserError, match="no MAE decoder"):
    inputs.load_autoencoder(models["a"])


def test_cli_cka_attention_reconstruct(models, tmp_path):
  out = str(tmp_path / "out")
  with flagsaver.flagsaver(model_a=models["a"], model_b=models["mae"], name_b="B", out=out,
                           batch_size=16, num_batches=2, layers_a=["0", "2", "3"]):
    analyze.main(["analyze", "cka"])
  matrix = np.load(os.path.join(out, "cka.npy"))
  assert matrix.shape == (3, 3) and np.all(np.isfinite(matrix))
  with open(os.path.join(out, "cka.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["model_a"]["layers"] == [0, 2, 3] and report["model_b"]["layers"] == [0, 1, 2]
  assert report["model_b"]["name"] == "B" and report["num_examples"] == 32
  np.testing.assert_allclose(report["cka"], matrix)

  with flagsaver.flagsaver(model=[models["a"], models["mae"]], out=out, batch_size=8,
                           num_batches=1, query_token=5):
    analyze.main(["analyze", "attention"])
  distance = np.load(os.path.join(out, "attention_distance.npy"))
  entropy = np.load(os.path.join(out, "attention_entropy.npy"))
  assert distance.shape == entropy.shape == (2, 3, 6)  # models, layers, heads
  assert np.isnan(distance[1, 2]).all() and np.isnan(distance[1, :, 4:]).all()
  finite = entropy[~np.isnan(entropy)]
  assert np.all((finite > 0) & (finite <= math.log(16) + 1e-5))
  assert np.all(distance[~np.isnan(distance)] > 0)

  with flagsaver.flagsaver(model=[models["mae"]], out=out, num_images=2, mask_ratio=0.5):
    analyze.main(["analyze", "reconstruct"])
  for name in ("cka.png", "attention_distance.png", "attention_entropy.png", "attention.json",
               "attention_maps_a.png", "attention_maps_mae.png", "reconstruction.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name


@pytest.mark.parametrize("flag_values, message", [
    (lambda m: dict(model_a=m["a"], model_b=m["patch4"]), "65"),
    (lambda m: dict(model_a=m["a"], model_b=m["a"], batch_size=3), "n > 3"),
    (lambda m: dict(model_a=m["a"], model_b=m["mae"], layers_b=["7"]), "0..2"),
])
def test_cli_errors_are_one_line_and_exit_2(models, tmp_path, capsys, flag_values, message):
  with flagsaver.flagsaver(out=str(tmp_path), **{"batch_size": 8, "num_batches": 1,
                                                 **flag_values(models)}):
    with pytest.raises(SystemExit) as exit_info:
      analyze.main(["analyze", "cka"])
  assert exit_info.value.code == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


@pytest.mark.slow
def test_module_entry_point_reports_a_user_error(models, tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.analyze", "reconstruct", f"--model={models['a']}",
       f"--out={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no MAE decoder" in errors[0]
