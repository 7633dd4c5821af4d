"""MaskFeat: loss and gradients against a float64 torch transcription of SlowFast's image
MaskFeat (`MaskMViT._maskfeat_forward`, `MSSeparateHead`, `MultipleMSELoss`) with masks from
the block-wise generator, HOG targets from a transcription of `HOGLayerC`; layout and bad
input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shipped_config
from mim_jax.errors import ConfigError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer.tree import flatten_with_names
from test_hog import torch_maskfeat_targets

def load_config(arg):
  return shipped_config("maskfeat_vit_tiny.py", arg)


def maskfeat_config(arg="demo"):
  config = load_config(arg)
  config.image_size = 32
  config.model.update(variant="", width=32, depth=2, num_heads=4, patch_size=8)
  return config


def perturbed_params(task, seed=0):
  params = task.init_params(jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed + 100)
  return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                      .astype(np.float32), params)


def torch_maskfeat_loss(torch, p, images_normalised, targets, mask, *, patch, heads):
  """The ViT path of `_maskfeat_forward` in float64: patch embedding, mask tokens, cls,
  learned position embedding, blocks, the separate head (LayerNorm + Linear) on the
  masked tokens of the last block, nn.MSELoss."""
  f = torch.nn.functional
  enc = p["encoder"]
  b = images_normalised.shape[0]

  def ln(x, q):
    return f.layer_norm(x, x.shape[-1:], q["scale"], q["bias"], eps=1e-6)

  def block(x, q):
    n, d = x.shape[1], x.shape[2]
    qkv = (ln(x, q["norm1"]) @ q["attn"]["qkv"]["kernel"] + q["attn"]["qkv"]["bias"])
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    a = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads)**-0.5
    out = (a.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, d)
    x = x + out @ q["attn"]["proj"]["kernel"] + q["attn"]["proj"]["bias"]
    h = ln(x, q["norm2"]) @ q["mlp"]["fc1"]["kernel"] + q["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    return x + h @ q["mlp"]["fc2"]["kernel"] + q["mlp"]["fc2"]["bias"]

  x = images_normalised.permute(0, 3, 1, 2)
  weight = enc["patch_embed"]["proj"]["kernel"].permute(3, 2, 0, 1)
  x = f.conv2d(x, weight, enc["patch_embed"]["proj"]["bias"], stride=patch).flatten(2)
  x = x.transpose(1, 2)
  float_mask = mask.flatten(1).unsqueeze(-1).type_as(x)
  x = x * (1 - float_mask) + enc["mask_token"].expand(b, x.shape[1], -1) * float_mask
  x = torch.cat((enc["cls_token"].expand(b, -1, -1), x), dim=1) + enc["pos_embed"]
  for i in range(2):
    x = block(x, enc[f"blocks_{i}"])
  head = p["head"]
  x = ln(x, head["norm"])[:, 1:]
  selected = mask.flatten(1).bool()
  pred = x[selected] @ head["proj"]["kernel"] + head["proj"]["bias"]
  return f.mse_loss(pred, targets[selected])


def test_maskfeat_loss_and_gradients_match_torch_reference():
  torch = pytest.importorskip("torch")
  task = build_task(maskfeat_config())
  params = perturbed_params(task)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  masks = np.stack([task.masker.make(np.random.default_rng(seed)) for seed in (1, 2, 3)])
  assert masks.shape == (3, 4, 4) and masks.any(axis=(1, 2)).all()

  def loss_fn(p):
    return task.loss_terms(p, jnp.asarray(images), jnp.asarray(masks))[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  normalised = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  # The reference computes HOG on the normalised image: the same function in exact
  # arithmetic (tests/test_hog.py), evaluated here on the integer pixels where float32
  # rounding cannot move a gradient across a bin edge.
  targets = torch_maskfeat_targets(images.astype(np.float32), 8, 0)
  t_params = jax.tree.map(
      lambda x: torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True), params)
  t_loss = torch_maskfeat_loss(torch, t_params, torch.tensor(normalised, dtype=torch.float64),
                               torch.tensor(targets, dtype=torch.float64),
                               torch.tensor(masks), patch=8, heads=4)
  t_loss.backward()
  np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
  t_grads = flatten_with_names(jax.tree.map(lambda t: t.grad, t_params))
  for name, grad in flatten_with_names(grads).items():
    expected = t_grads[name].numpy()
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(grad, expected, atol=1e-4 * scale, rtol=1e-3, err_msg=name)


def test_maskfeat_layout_targets_and_decay_groups():
  task = build_task(maskfeat_config())
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  params = flatten_with_names(abstract)
  assert params["head/proj/kernel"].shape == (32, 27)  # one 8-px cell x 3 channels x 9 bins
  assert "encoder/norm/scale" not in params  # the reference deletes the final norm
  assert params["encoder/pos_embed"].shape == (1, 17, 32)
  mask = flatten_with_names(task.weight_decay_mask(abstract))
  assert mask["encoder/pos_embed"] and mask["encoder/cls_token"] and mask["encoder/mask_token"]
  assert not mask["encoder/blocks_0/norm1/scale"] and not mask["head/proj/bias"]
  spec = task.data_spec
  assert spec.batch_keys == ("image", "token_mask")
  assert task.masker.num_masking_patches == round(16 * 0.4)
  full = build_task(load_config(None))
  assert full.target_size == 108 and full.masker.num_masking_patches == 78


@pytest.mark.parametrize("change, message", [
    (lambda c: c.maskfeat.update(hog_cell_size=3), "not a multiple of maskfeat.hog_cell_size=3"),
    (lambda c: c.maskfeat.update(hog_bins=0), "maskfeat.hog_bins=0"),
    (lambda c: c.update(mask_ratio=0.0), "mask_ratio=0.0"),
])
def test_bad_maskfeat_settings_are_one_line_errors(change, message):
  config = maskfeat_config()
  change(config)
  with pytest.raises(ConfigError, match=message):
    build_task(config)
