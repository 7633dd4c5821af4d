"""ViT / MAE models against an independent numpy forward and the reference counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mim_jax.models import posembed
from mim_jax.models.mae import MAEDecoder, MaskedAutoencoder
from mim_jax.models.vit import VisionTransformer
from mim_jax.trainer.tree import count_params, flatten_with_names


def init(module, *args, **kwargs):
  return module.init(jax.random.PRNGKey(0), *args, **kwargs)["params"]


def test_vit_tiny_parameter_count_matches_timm_layout():
  # timm's vit_tiny_patch16_224 (learned pos_embed, 1000-class head): 5,717,416.
  model = VisionTransformer(posemb="learn", num_classes=1000)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count_params(params) == 5_717_416


def test_mae_tiny_decoder_parameter_count():
  d, w, out = 192, 96, 16 * 16 * 3
  block = 2 * (2 * w) + (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
  expected = (d * w + w) + w + block + 2 * w + (w * out + out)  # embed, mask token, block, norm, pred
  assert expected == 205_152
  mae = MaskedAutoencoder(VisionTransformer(), MAEDecoder(width=96, depth=1, num_heads=3))
  ids_keep = jnp.zeros((1, 49), jnp.int32)
  ids_restore = jnp.arange(196)[None]
  params = jax.eval_shape(mae.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                          ids_keep, ids_restore)["params"]
  assert count_params(params["decoder"]) == expected
  # Pre-training encoder: timm's count minus the learned pos_embed and the head.
  assert count_params(params["encoder"]) == 5_717_416 - 197 * 192 - (192 * 1000 + 1000)


def reference_sincos(embed_dim, grid_size):
  """MAE's get_2d_sincos_pos_embed, written out independently."""
  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                              np.arange(grid_size, dtype=np.float32)), axis=0)
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_mae_reference():
  np.testing.assert_allclose(posembed.sincos_2d(192, 14, cls_token=True),
                             reference_sincos(192, 14), atol=1e-6)


def test_sincos_position_embedding_is_not_a_parameter():
  params = init(VisionTransformer(width=32, depth=1, num_heads=4, patch_size=4),
                jnp.zeros((1, 16, 16, 3)))
  assert "pos_embed" not in params
  learned = init(VisionTransformer(width=32, depth=1, num_heads=4, patch_size=4,
                                   posemb="learn"), jnp.zeros((1, 16, 16, 3)))
  np.testing.assert_allclose(learned["pos_embed"][0], reference_sincos(32, 4), atol=1e-6)


def numpy_vit(p, images, patch, heads, ids_keep=None):
  """Independent numpy forward of the encoder; returns (tokens, [logits per block])."""
  def ln(x, q):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

  def dense(x, q):
    return x @ q["kernel"] + q["bias"]

  b, h, w, c = images.shape
  g = h // patch
  kernel = p["patch_embed"]["proj"]["kernel"]  # (p, p, c, d)
  d = kernel.shape[-1]
  patches = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, g * g, -1) @ kernel.reshape(-1, d) + p["patch_embed"]["proj"]["bias"]
  pos = reference_sincos(d, g)
  x = x + pos[1:]
  if ids_keep is not None:
    x = np.take_along_axis(x, ids_keep[..., None], axis=1)
  x = np.concatenate([np.broadcast_to(p["cls_token"] + pos[:1], (b, 1, d)), x], axis=1)
  all_logits = []
  i = 0
  while f"blocks_{i}" in p:
    q = p[f"blocks_{i}"]
    y = ln(x, q["norm1"])
    qkv = dense(y, q["attn"]["qkv"]).reshape(b, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (d // heads) ** -0.5
    all_logits.append(logits)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + dense(out, q["attn"]["proj"])
    y = dense(ln(x, q["norm2"]), q["mlp"]["fc1"])
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + dense(y, q["mlp"]["fc2"])
    i += 1
  return ln(x, p["norm"]), all_logits


@pytest.mark.parametrize("use_mask", [False, True])
def test_encoder_matches_numpy_reference(use_mask):
  model = VisionTransformer(patch_size=4, width=32, depth=3, num_heads=4)
  images = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  ids_keep = np.array([[3, 0, 9, 14], [15, 2, 7, 1]]) if use_mask else None
  params = init(model, images)
  # Non-trivial biases and norms so that a mix-up of any of them shows.
  params = jax.tree.map(lambda x: x + 0.1 * np.random.RandomState(x.size).randn(*x.shape)
                        .astype(np.float32), params)
  out = model.apply({"params": params}, images, ids_keep=ids_keep, capture_layers=(1, 3))
  np_params = jax.tree.map(np.asarray, params)
  tokens, logits = numpy_vit(np_params, images.astype(np.float64), 4, 4, ids_keep)
  np.testing.assert_allclose(out["tokens"], tokens, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(out["attn_logits"][1], logits[0], atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(out["attn_logits"][3], logits[2], atol=2e-4, rtol=2e-4)
  assert set(out["attn_logits"]) == {1, 3}


def test_capturing_layers_does_not_change_outputs():
  model = VisionTransformer(patch_size=4, width=32, depth=3, num_heads=4)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params = init(model, images)
  plain = model.apply({"params": params}, images)
  captured = model.apply({"params": params}, images, capture_layers=(0, 1, 2, 3))
  np.testing.assert_array_equal(plain["tokens"], captured["tokens"])
  assert plain["attn_logits"] == {} and plain["hidden"] == {}
  assert captured["attn_logits"][2].shape == (2, 4, 17, 17)
  # Layer-k representation is block k+1's LN1 of block k's output; the last is the final norm.
  np.testing.assert_array_equal(captured["hidden"][3], captured["tokens"])
  assert captured["hidden"][0].shape == captured["hidden"][1].shape == (2, 17, 32)
  with pytest.raises(ValueError, match="capture layer 4"):
    model.apply({"params": params}, images, capture_layers=(4,))


def test_mae_initialisation():
  model = VisionTransformer(patch_size=16, width=192, depth=2, num_heads=12)
  params = flatten_with_names(init(model, jnp.zeros((1, 32, 32, 3))))
  for name, value in params.items():
    if name.endswith("bias"):
      assert np.all(value == 0), name
    if name.endswith("scale"):
      assert np.all(value == 1), name
  # Patch projection: xavier-uniform on the (192, 3*16*16) view.
  kernel = np.asarray(params["patch_embed/proj/kernel"])
  bound = np.sqrt(6.0 / (768 + 192))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  qkv = np.asarray(params["blocks_0/attn/qkv/kernel"])
  assert np.abs(qkv).max() <= np.sqrt(6.0 / (192 + 576))
  np.testing.assert_allclose(np.std(params["cls_token"]), 0.02, rtol=0.3)


def test_gap_pool_uses_fc_norm_and_no_final_norm():
  model = VisionTransformer(patch_size=4, width=32, depth=1, num_heads=4, num_classes=5,
                            pool="gap", posemb="learn")
  params = init(model, jnp.zeros((1, 16, 16, 3)))
  assert "fc_norm" in params and "norm" not in params
  out = model.apply({"params": params}, jnp.ones((2, 16, 16, 3)))
  assert out["logits"].shape == (2, 5)


def test_image_size_not_divisible_is_an_error():
  with pytest.raises(ValueError, match="not divisible by patch size"):
    init(VisionTransformer(patch_size=16, width=32, depth=1, num_heads=4),
         jnp.zeros((1, 40, 40, 3)))


def test_drop_path_is_per_example_and_rescales_kept_branches():
  from mim_jax.models.vit import DropPath
  x = jnp.ones((4000, 3, 2))
  out = DropPath(0.25).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  per_example = np.asarray(out).reshape(4000, -1)
  # Every example is either dropped entirely or kept and scaled by 1 / 0.75.
  assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(DropPath(0.25).apply({}, x, True), x)


def test_stochastic_depth_only_in_training_and_linspace_per_block():
  model = VisionTransformer(patch_size=8, width=32, depth=3, num_heads=4,
                            drop_path_rate=0.3)
  images = jnp.asarray(np.random.RandomState(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images)
  plain = VisionTransformer(patch_size=8, width=32, depth=3, num_heads=4)
  np.testing.assert_array_equal(model.apply(params, images)["tokens"],
                                plain.apply(params, images)["tokens"])
  trained = model.apply(params, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(trained["tokens"], plain.apply(params, images)["tokens"])
  rates = []

  def record_rates(next_fun, args, kwargs, context):
    if type(context.module).__name__ == "DropPath":
      rates.append(context.module.rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_rates):
    model.apply(params, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(sorted(set(rates)), [0.0, 0.15, 0.3])  # torch.linspace(0, .3, 3)
