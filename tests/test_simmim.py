"""SimMIM: loss and gradients against a float64 torch transcription of microsoft/SimMIM
(`VisionTransformerForSimMIM`, `SimMIM`, `MaskGenerator`), the schedule, and bad input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shipped_config
from mim_jax.errors import ConfigError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import optim
from mim_jax.trainer.tree import flatten_with_names

def simmim_config(arg="demo"):
  config = shipped_config("simmim_vit_tiny.py", arg)
  config.image_size = 32
  config.model.update(variant="", width=32, depth=2, num_heads=4, patch_size=8)
  config.simmim.mask_patch_size = 16  # a 2x2 grid of mask patches, each 2x2 model patches
  return config


def perturbed_params(task, seed=0):
  """Init params plus noise on every leaf: the bias table, gammas, q/v biases non-trivial."""
  params = task.init_params(jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed + 100)
  return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                      .astype(np.float32), params)


def torch_simmim_loss(torch, p, images, noise, *, patch, heads, mask_patch, mask_ratio):
  """SimMIM's ViT pre-training forward in float64, from the reference code."""
  f = torch.nn.functional
  b, size = images.shape[0], images.shape[1]
  grid = size // patch

  # MaskGenerator: permutation -> first ceil(g*g*ratio) masked -> repeat to the patch grid.
  rand_size, scale = size // mask_patch, mask_patch // patch
  count = int(np.ceil(rand_size**2 * mask_ratio))
  masks = []
  for row in noise:
    mask_idx = np.argsort(row, kind="stable")[:count]
    mask = np.zeros(rand_size**2, dtype=int)
    mask[mask_idx] = 1
    mask = mask.reshape(rand_size, rand_size).repeat(scale, axis=0).repeat(scale, axis=1)
    masks.append(mask)
  mask = torch.tensor(np.stack(masks))

  # RelativePositionBias.__init__, shared by all blocks.
  window = (grid, grid)
  num_relative_distance = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
  coords = torch.stack(torch.meshgrid([torch.arange(window[0]), torch.arange(window[1])],
                                      indexing="ij"))
  coords_flatten = torch.flatten(coords, 1)
  relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0)
  relative_coords[:, :, 0] += window[0] - 1
  relative_coords[:, :, 1] += window[1] - 1
  relative_coords[:, :, 0] *= 2 * window[1] - 1
  index = torch.zeros((window[0] * window[1] + 1,) * 2, dtype=relative_coords.dtype)
  index[1:, 1:] = relative_coords.sum(-1)
  index[0, 0:] = num_relative_distance - 3
  index[0:, 0] = num_relative_distance - 2
  index[0, 0] = num_relative_distance - 1
  enc = p["encoder"]
  table = enc["rel_pos_bias"]["relative_position_bias_table"]
  n = grid * grid + 1
  rel_pos_bias = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

  def ln(x, q):
    return f.layer_norm(x, x.shape[-1:], q["scale"], q["bias"], eps=1e-6)

  def block(x, q):
    h = ln(x, q["norm1"])
    attn = q["attn"]
    bias = torch.cat((attn["q_bias"], torch.zeros_like(attn["v_bias"]), attn["v_bias"]))
    qkv = f.linear(h, attn["qkv"]["kernel"].T, bias)
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    qq, k, v = qkv[0], qkv[1], qkv[2]
    qq = qq * (x.shape[-1] // heads)**-0.5
    a = (qq @ k.transpose(-2, -1)) + rel_pos_bias
    out = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    out = out @ attn["proj"]["kernel"] + attn["proj"]["bias"]
    x = x + q["gamma_1"] * out
    h = ln(x, q["norm2"]) @ q["mlp"]["fc1"]["kernel"] + q["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    return x + q["gamma_2"] * (h @ q["mlp"]["fc2"]["kernel"] + q["mlp"]["fc2"]["bias"])

  # VisionTransformerForSimMIM.forward (NCHW conv patch embedding).
  x_nchw = images.permute(0, 3, 1, 2)
  weight = enc["patch_embed"]["proj"]["kernel"].permute(3, 2, 0, 1)  # (d, 3, p, p)
  x = f.conv2d(x_nchw, weight, enc["patch_embed"]["proj"]["bias"], stride=patch)
  x = x.flatten(2).transpose(1, 2)
  w = mask.flatten(1).unsqueeze(-1).type_as(x)
  x = x * (1 - w) + enc["mask_token"].expand(b, grid * grid, -1) * w
  x = torch.cat((enc["cls_token"].expand(b, -1, -1), x), dim=1)
  for i in range(2):
    x = block(x, enc[f"blocks_{i}"])
  z = ln(x, enc["norm"])[:, 1:]
  z = z.permute(0, 2, 1).reshape(b, -1, grid, grid)

  # SimMIM.forward: 1x1 conv + PixelShuffle, L1 on masked pixels.
  head = p["head"]
  conv = head["kernel"].T[:, :, None, None]  # (3*p*p, d, 1, 1)
  x_rec = f.pixel_shuffle(f.conv2d(z, conv, head["bias"]), patch)
  pixel_mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
  loss_recon = f.l1_loss(x_nchw, x_rec, reduction="none")
  return (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3


def test_simmim_loss_and_gradients_match_torch_reference():
  torch = pytest.importorskip("torch")
  config = simmim_config()
  task = build_task(config)
  params = perturbed_params(task)
  rng = np.random.RandomState(0)
  images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  noise = rng.uniform(size=(3, 4)).astype(np.float32)

  def loss_fn(p):
    return task.loss_terms(p, jnp.asarray(images), jnp.asarray(noise))[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  t_params = jax.tree.map(
      lambda x: torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True), params)
  t_loss = torch_simmim_loss(torch, t_params, torch.tensor(images, dtype=torch.float64), noise,
                             patch=8, heads=4, mask_patch=16, mask_ratio=0.6)
  t_loss.backward()
  np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
  t_grads = flatten_with_names(jax.tree.map(lambda t: t.grad, t_params))
  for name, grad in flatten_with_names(grads).items():
    expected = t_grads[name].numpy()
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(grad, expected, atol=2e-5 * scale, rtol=1e-3, err_msg=name)
  # Every part learns: mask token, bias table, layer scales, q/v biases, head.
  flat = flatten_with_names(grads)
  for name in ("encoder/mask_token", "encoder/rel_pos_bias/relative_position_bias_table",
               "encoder/blocks_1/gamma_2", "encoder/blocks_0/attn/q_bias", "head/kernel"):
    assert np.abs(flat[name]).max() > 0, name


def test_simmim_params_follow_the_reference_layout_and_decay_groups():
  task = build_task(simmim_config())
  params = flatten_with_names(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  assert "encoder/blocks_0/attn/qkv/bias" not in params  # q and v biases only
  assert params["encoder/blocks_0/attn/q_bias"].shape == (32,)
  assert params["encoder/rel_pos_bias/relative_position_bias_table"].shape == (7 * 7 + 3, 4)  # (2g - 1)^2 + 3 for a 4x4 grid
  assert "encoder/pos_embed" not in params
  assert params["head/kernel"].shape == (32, 3 * 8 * 8)
  mask = flatten_with_names(task.weight_decay_mask(
      jax.eval_shape(task.init_params, jax.random.PRNGKey(0))))
  # SimMIM's ViT: 1-D leaves and cls_token/pos_embed are not decayed; the mask token and the
  # relative position bias table are.
  assert mask["encoder/mask_token"] and mask["encoder/rel_pos_bias/relative_position_bias_table"]
  assert not mask["encoder/cls_token"] and not mask["encoder/blocks_0/gamma_1"]
  assert not mask["encoder/blocks_0/attn/q_bias"] and mask["head/kernel"]


def test_simmim_init_is_the_references():
  task = build_task(simmim_config())
  params = flatten_with_names(task.init_params(jax.random.PRNGKey(0)))
  qkv = np.asarray(params["encoder/blocks_0/attn/qkv/kernel"])
  assert np.abs(qkv).max() <= 0.02 + 1e-7  # N(0, 0.02) truncated at one std
  proj0 = np.asarray(params["encoder/blocks_0/attn/proj/kernel"])
  proj1 = np.asarray(params["encoder/blocks_1/attn/proj/kernel"])
  assert np.abs(proj0).max() <= 0.02 / np.sqrt(2) + 1e-7  # fix_init_weight: / sqrt(2 * 1)
  assert np.abs(proj1).max() <= 0.02 / np.sqrt(4) + 1e-7  # / sqrt(2 * 2)
  np.testing.assert_array_equal(params["encoder/blocks_0/gamma_1"], np.float32(0.1))
  assert not np.any(params["encoder/rel_pos_bias/relative_position_bias_table"])
  bound = 1 / np.sqrt(32)  # PyTorch's default Conv2d init of the 1x1 decoder conv
  assert np.abs(params["head/kernel"]).max() <= bound < 1.2 * np.abs(params["head/kernel"]).max()


def test_warmup_multistep_schedule_is_simmims():
  schedule = optim.warmup_multistep(4e-4, warmup_steps=10, milestones=[30, 50], decay_rate=0.1,
                                    start_lr=2e-6)
  expected = {0: 2e-6, 5: 2e-6 + 5 * (4e-4 - 2e-6) / 10, 10: 4e-4, 29: 4e-4, 30: 4e-5,
              49: 4e-5, 50: 4e-6}
  for step, lr in expected.items():
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-6, err_msg=str(step))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.simmim.update(mask_patch_size=12), "multiple of model.patch_size=8"),
    (lambda c: c.simmim.update(mask_patch_size=24), "not divisible by simmim.mask_patch_size"),
    (lambda c: c.update(mask_ratio=1.0), "mask_ratio=1.0"),
    (lambda c: c.model.update(rel_pos_bias="global"), "model.rel_pos_bias='global'"),
    (lambda c: c.model.update(layer_scale=-1.0), "model.layer_scale=-1.0"),
])
def test_bad_simmim_settings_are_one_line_errors(change, message):
  config = simmim_config()
  change(config)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    build_task(config)
