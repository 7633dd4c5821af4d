"""PyTorch converter: timm / MAE / MAE-Lite state_dicts <-> mim_jax params.

Every numerical check compares with timm (or with a torch / numpy reference
written here), never with values the converter computed.
"""

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402

from mim_jax.convert import converted, torch_format, torch_io  # noqa: E402
from mim_jax.errors import UserError  # noqa: E402
from mim_jax.models.mae import MAEDecoder  # noqa: E402
from mim_jax.models.vit import VARIANTS, VisionTransformer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4
# A small ViT for the properties that do not need the full size.
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


# ----------------------------------------------------------------------------
# References written independently of the converter
# ----------------------------------------------------------------------------
def mae_sincos_1d(embed_dim, pos):
  """MAE's util/pos_embed.py get_1d_sincos_pos_embed_from_grid, in numpy."""
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_sincos_2d(embed_dim, grid_size):
  """MAE's get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True), as float32."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([mae_sincos_1d(embed_dim // 2, grid[0]),
                        mae_sincos_1d(embed_dim // 2, grid[1])], axis=1)
  emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return torch.from_numpy(emb).float().unsqueeze(0)  # as MAE's initialize_weights


def perturb_torch(module, seed):
  """Random values everywhere (timm inits norms to 1 and biases to 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=gen))
  return module


def timm_vit(seed=0, **kwargs):
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
  return perturb_torch(model, seed).eval()


def numpy_state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def images(batch, size, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def timm_outputs(model, x):
  with torch.no_grad():
    features = model.forward_features(torch.from_numpy(x))
    logits = model.forward_head(features)
  return features.numpy(), logits.numpy()


def mim_model(arch):
  return converted.build_encoder(arch, extra_attention_block=arch["extra_attention_block"])


def mim_outputs(arch, params, x, **kwargs):
  apply = jax.jit(partial(mim_model(arch).apply, **kwargs))  # compiles faster than eager
  out = apply({"params": params["encoder"]}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  return jax.tree_util.tree_map(np.asarray, out)


def assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def assert_same_tensors(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key in expected:
    assert actual[key].shape == expected[key].shape, key
    assert np.array_equal(actual[key], expected[key]), key


# ----------------------------------------------------------------------------
# mim_jax -> timm
# ----------------------------------------------------------------------------
def random_mim_params(model, image_size, seed):
  """Random values in the tree `model.init` makes (its own init is slow on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":  # unit-variance activations: std 1/sqrt(fan_in)
      value = rng.normal(0, np.prod(shape[:-1])**-0.5, shape)
    else:  # LayerNorm scales near 1; biases, tokens, pos_embed non-zero
      value = (name == "scale") + rng.normal(0, 0.1, shape)
    return value.astype(np.float32)

  return {"encoder": jax.tree_util.tree_map_with_path(draw, shapes)}


EXPORT_CASES = {
    # name: (mim_jax VisionTransformer kwargs, image size, timm kwargs written by hand)
    "tiny_cls_head": (dict(**VARIANTS["tiny"], pool="cls", num_classes=7), 224,
                      dict(num_heads=12, num_classes=7, global_pool="token")),
    "tiny_gap_head": (dict(**VARIANTS["tiny"], pool="gap", num_classes=7, posemb="learn"), 224,
                      dict(num_heads=12, num_classes=7, global_pool="avg")),
    "small_cls": (dict(**VARIANTS["small"], pool="cls", num_classes=0), 224,
                  dict(embed_dim=384, num_heads=12, num_classes=0, global_pool="token")),
    "small_gap_head": (dict(**VARIANTS["small"], pool="gap", num_classes=5), 224,
                       dict(embed_dim=384, num_heads=12, num_classes=5, global_pool="avg")),
    # pool='gap' without a head: mim_jax has neither norm nor fc_norm.
    "gap_no_head": (dict(patch_size=8, width=32, depth=2, num_heads=4, pool="gap"), 32,
                    dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                         num_classes=0, global_pool="avg", final_norm=False)),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_strictly_into_timm_and_matches(case):
  model_kwargs, size, timm_kwargs = EXPORT_CASES[case]
  model = VisionTransformer(**model_kwargs)
  params = random_mim_params(model, size, seed=len(case))
  arch = converted.check_arch({"image_size": size, **model_kwargs})
  state_dict = torch_format.state_dict_from_params(params, arch)

  # weight_init='skip': every value is loaded below (and timm's init is slow on CPU).
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, weight_init="skip",
                                **timm_kwargs).eval()
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = images(2, size)
  features, logits = timm_outputs(reference, x)
  out = mim_outputs(arch, params, x)
  assert_close(out["tokens"], features)
  if model_kwargs.get("num_classes"):
    assert_close(out["logits"], logits)

  # The kwargs the converter prints build a model that loads the same file strictly.
  printed = timm.create_model(torch_format.timm_model_name(arch), weight_init="skip",
                              **torch_format.timm_model_kwargs(
                                  arch, fc_norm=torch_format.has_fc_norm(params)))
  printed.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)


# ----------------------------------------------------------------------------
# timm / MAE -> mim_jax
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("timm_kwargs", [
    dict(num_classes=6, global_pool="token"),
    dict(num_classes=6, global_pool="avg"),
    dict(num_classes=0, global_pool="avg"),
], ids=["cls_head", "gap_head", "gap_no_head"])
def test_timm_state_dict_round_trips_bit_exactly(timm_kwargs):
  source = timm_vit(**SMALL, **timm_kwargs)
  state_dict = numpy_state_dict(source)
  params, arch = torch_format.params_from_state_dict(state_dict, num_heads=4, source="timm")
  assert arch["posemb"] == "learn"
  assert arch["pool"] == ("gap" if timm_kwargs["global_pool"] == "avg" else "cls")
  assert (arch["num_classes"], arch["depth"], arch["image_size"]) == (
      timm_kwargs["num_classes"], 2, 32)
  assert_same_tensors(torch_format.state_dict_from_params(params, arch), state_dict)

  x = images(2, 32, seed=1)
  features, logits = timm_outputs(source, x)
  out = mim_outputs(arch, params, x)
  assert_close(out["tokens"], features)
  if timm_kwargs["num_classes"]:
    assert_close(out["logits"], logits)


def test_timm_without_cls_position_slot():
  """timm's no_embed_class=True is a zero cls slot: same outputs, exported with the slot."""
  source = timm_vit(**SMALL, num_classes=3, no_embed_class=True)
  state_dict = numpy_state_dict(source)
  assert state_dict["pos_embed"].shape == (1, 16, 32)
  params, arch = torch_format.params_from_state_dict(state_dict, num_heads=4)
  x = images(2, 32, seed=2)
  features, logits = timm_outputs(source, x)
  out = mim_outputs(arch, params, x)
  assert_close(out["tokens"], features)
  assert_close(out["logits"], logits)

  exported = torch_format.state_dict_from_params(params, arch)
  assert np.array_equal(exported["pos_embed"][:, 1:], state_dict["pos_embed"])
  assert not exported["pos_embed"][:, 0].any()
  assert_same_tensors({k: v for k, v in exported.items() if k != "pos_embed"},
                      {k: v for k, v in state_dict.items() if k != "pos_embed"})
  standard = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL,
                               num_classes=3).eval()
  standard.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert_close(timm_outputs(standard, x)[1], logits)


def mae_decoder_modules(encoder_width, width, depth, heads, patch, seed):
  """MAE's decoder pieces (models_mae.MaskedAutoencoderViT), random values."""
  norm = partial(torch.nn.LayerNorm, eps=1e-6)
  modules = torch.nn.ModuleDict({
      "decoder_embed": torch.nn.Linear(encoder_width, width),
      "decoder_blocks": torch.nn.ModuleList(
          [TimmBlock(width, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]),
      "decoder_norm": norm(width),
      "decoder_pred": torch.nn.Linear(width, patch * patch * 3),
  })
  modules.mask_token = torch.nn.Parameter(torch.zeros(1, 1, width))
  return perturb_torch(modules, seed).eval()


def mae_decoder_forward(modules, pos_embed, latent, ids_restore):
  """MAE's forward_decoder, verbatim in torch."""
  x = modules["decoder_embed"](latent)
  mask_tokens = modules.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
  x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
  x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
  x = torch.cat([x[:, :1, :], x_], dim=1) + pos_embed
  for block in modules["decoder_blocks"]:
    x = block(x)
  return modules["decoder_pred"](modules["decoder_norm"](x))[:, 1:, :]


def mae_state_dict(seed=0):
  """A MAE `*_full.pth`-style model: sin-cos pos_embed, timm encoder keys, decoder."""
  encoder = timm_vit(seed, **SMALL, num_classes=0)
  with torch.no_grad():
    encoder.pos_embed.copy_(mae_sincos_2d(32, 4))
  decoder = mae_decoder_modules(32, 16, 2, 2, 8, seed + 1)
  decoder_pos = mae_sincos_2d(16, 4)
  state_dict = numpy_state_dict(encoder)
  state_dict.update(numpy_state_dict(decoder))
  state_dict["decoder_pos_embed"] = decoder_pos.numpy()
  return state_dict, encoder, decoder, decoder_pos


def test_mae_state_dict_round_trips_and_matches_reference():
  state_dict, encoder, decoder, decoder_pos = mae_state_dict()
  params, arch = torch_format.params_from_state_dict(state_dict, num_heads=4,
                                                     decoder_num_heads=2)
  assert arch["posemb"] == "sincos" and "pos_embed" not in params["encoder"]
  assert arch["decoder"] == {"width": 16, "depth": 2, "num_heads": 2}
  assert_same_tensors(torch_format.state_dict_from_params(params, arch, include_decoder=True),
                      state_dict)
  encoder_only = torch_format.state_dict_from_params(params, arch)
  assert not any(k.startswith("decoder_") or k == "mask_token" for k in encoder_only)

  x = images(2, 32, seed=3)
  assert_close(mim_outputs(arch, params, x)["tokens"], timm_outputs(encoder, x)[0])

  rng = np.random.default_rng(4)
  latent = rng.normal(size=(2, 5, 32)).astype(np.float32)  # cls + 4 kept of 16 patches
  ids_restore = np.argsort(np.argsort(rng.random((2, 16)), axis=1), axis=1)
  with torch.no_grad():
    expected = mae_decoder_forward(decoder, decoder_pos, torch.from_numpy(latent),
                                   torch.from_numpy(ids_restore)).numpy()
  dec = arch["decoder"]
  actual = MAEDecoder(patch_size=8, width=dec["width"], depth=dec["depth"],
                      num_heads=dec["num_heads"]).apply(
                          {"params": params["decoder"]}, jnp.asarray(latent),
                          jnp.asarray(ids_restore))
  assert_close(np.asarray(actual), expected)


def test_decoder_pos_embed_must_be_sincos():
  state_dict, *_ = mae_state_dict()
  state_dict["decoder_pos_embed"] = state_dict["decoder_pos_embed"] + 1e-3
  with pytest.raises(UserError, match="decoder_pos_embed"):
    torch_format.params_from_state_dict(state_dict, num_heads=4, decoder_num_heads=2)


def test_export_without_decoder_weights_is_an_error():
  params, arch = torch_format.params_from_state_dict(
      numpy_state_dict(timm_vit(**SMALL, num_classes=0)), num_heads=4)
  with pytest.raises(UserError, match="this checkpoint has no decoder weights"):
    torch_format.state_dict_from_params(params, arch, include_decoder=True)


# ----------------------------------------------------------------------------
# MAE-Lite: D²-MAE student with block 13, distillation wrapper keys
# ----------------------------------------------------------------------------
def test_d2mae_mae_lite_checkpoint():
  """MAE-Lite's D²-MAE run: `module.model.` student whose last block is attention-only,
  beside `module.tch_model.` (teacher) and `module.attn_adapter.adapter11.weight`."""
  full = timm_vit(5, **{**SMALL, "depth": 3}, num_classes=0)  # blocks 0, 1 and the extra 2
  student = {k: v for k, v in numpy_state_dict(full).items()
             if not k.startswith(("blocks.2.attn.proj", "blocks.2.norm2", "blocks.2.mlp"))}
  teacher = numpy_state_dict(timm_vit(6, **SMALL, num_classes=0))
  wrapped = {f"module.model.{k}": v for k, v in student.items()}
  wrapped.update({f"module.tch_model.{k}": v for k, v in teacher.items()})
  wrapped["module.attn_adapter.adapter11.weight"] = np.ones((4, 4, 1, 1), np.float32)
  wrapped["module.ema_model.module.cls_token"] = student["cls_token"]

  result = torch_format.import_state_dict(wrapped, num_heads=4)
  arch, params = result.arch, result.params
  assert arch["depth"] == 2 and arch["extra_attention_block"]
  assert sorted(params["encoder"]["blocks_2"]) == ["attn", "norm1"]
  assert sorted(params["encoder"]["blocks_2"]["attn"]) == ["qkv"]
  dropped = " ".join(result.dropped)
  assert "teacher" in dropped and "attn_adapter.adapter11.weight" in dropped
  assert "ema_model.module.cls_token" in dropped

  exported = torch_format.state_dict_from_params(params, arch)
  assert_same_tensors(exported, {k: v for k, v in student.items()
                                 if not k.startswith("blocks.2.")})

  # Block 3's logits: LN1 -> qkv -> q k^T / sqrt(d_head) on block 2's output, in torch.
  x = images(2, 32, seed=7)
  with torch.no_grad():
    tokens = full._pos_embed(full.patch_embed(torch.from_numpy(x)))
    tokens = full.blocks[1](full.blocks[0](tokens))
    qkv = full.blocks[2].attn.qkv(full.blocks[2].norm1(tokens)).reshape(2, 17, 3, 4, 8)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    expected = (q @ k.transpose(-2, -1) * 8**-0.5).numpy()
  out = mim_outputs(arch, params, x, capture_layers=(3,))
  assert_close(out["attn_logits"][3], expected)


# ----------------------------------------------------------------------------
# Strictness
# ----------------------------------------------------------------------------
def small_state_dict():
  return numpy_state_dict(timm_vit(**SMALL, num_classes=4))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.norm2.weight"), "missing keys: blocks.1.norm2.weight"),
    (lambda sd: sd.update({"blocks.0.ls1.gamma": np.ones(32, np.float32)}),
     "unexpected keys: blocks.0.ls1.gamma"),
    (lambda sd: sd.update({"head.bias": np.ones(5, np.float32)}),
     r"shape mismatches .*head.bias \(5,\) != \(4,\)"),
    (lambda sd: sd.update({"blocks.1.attn.qkv.weight": np.ones((96, 31), np.float32)}),
     r"blocks.1.attn.qkv.weight \(96, 31\) != \(96, 32\)"),
], ids=["missing", "unexpected", "head_shape", "qkv_shape"])
def test_mismatched_state_dict_names_the_key(edit, message):
  state_dict = small_state_dict()
  edit(state_dict)
  with pytest.raises(UserError, match=message):
    torch_format.params_from_state_dict(state_dict, num_heads=4)


def test_heads_needed_for_unknown_width():
  with pytest.raises(UserError, match="--num_heads"):
    torch_format.params_from_state_dict(small_state_dict())


def test_not_a_vit_says_what_it_found():
  state_dict = {"fc.weight": np.zeros((3, 4), np.float32), "conv1.bias": np.zeros(3, np.float32)}
  with pytest.raises(UserError, match=r"not a ViT.*fc.weight \(3, 4\)"):
    torch_format.params_from_state_dict(state_dict)


# ----------------------------------------------------------------------------
# Files and the command line
# ----------------------------------------------------------------------------
def test_reads_pth_tar_with_model_key_and_safetensors(tmp_path):
  from safetensors.torch import save_file
  state_dict = small_state_dict()
  tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  tar = tmp_path / "last_epoch_ckpt.pth.tar"
  torch.save({"model": {f"module.{k}": v for k, v in tensors.items()}, "start_epoch": 3,
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, tar)
  read = torch_io.read_torch_checkpoint(str(tar))
  assert_same_tensors(read, {f"module.{k}": v for k, v in state_dict.items()})
  params, _ = torch_format.params_from_state_dict(read, num_heads=4)
  direct, _ = torch_format.params_from_state_dict(state_dict, num_heads=4)
  assert converted.content_hash(params) == converted.content_hash(direct)

  safe = tmp_path / "model.safetensors"
  save_file(tensors, str(safe))
  assert_same_tensors(torch_io.read_torch_checkpoint(str(safe)), state_dict)

  with pytest.raises(UserError, match="no such file"):
    torch_io.read_torch_checkpoint(str(tmp_path / "absent.pth"))
  (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="cannot read"):
    torch_io.read_torch_checkpoint(str(tmp_path / "garbage.pth"))


def test_reads_old_pickles_with_python_objects(tmp_path):
  """MAE's training checkpoints also pickle their argparse Namespace: read weights-only
  (torch_pickle.SAFE_GLOBALS), without --trust_pickle."""
  import argparse
  state_dict = small_state_dict()
  path = tmp_path / "checkpoint-399.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()},
              "args": argparse.Namespace(lr=1.0)}, path)
  assert_same_tensors(torch_io.read_torch_checkpoint(str(path)), state_dict)


def run_convert(*args):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  return subprocess.run([sys.executable, "-m", "mim_jax.convert", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_cli_round_trip_and_error(tmp_path):
  state_dict, *_ = mae_state_dict(seed=8)
  source = tmp_path / "mae_full.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, source)
  npz, pth = tmp_path / "mae.npz", tmp_path / "mae_full_again.pth"
  result = run_convert("from_torch", source, npz, "--num_heads=4", "--decoder_num_heads=2")
  assert result.returncode == 0, result.stderr
  assert "posemb sincos" in result.stdout
  result = run_convert("to_torch", npz, pth, "--include_decoder")
  assert result.returncode == 0, result.stderr
  assert_same_tensors(torch_io.read_torch_checkpoint(str(pth)), state_dict)

  loaded = converted.load_converted(str(npz))
  assert loaded.arch["decoder"] == {"width": 16, "depth": 2, "num_heads": 2}

  encoder_file = tmp_path / "encoder.safetensors"
  summary = torch_io.export_to_torch(str(npz), str(encoder_file))
  assert "strict=True" in str(summary) and "MAE decoder" in " ".join(summary.dropped)
  from safetensors.torch import load_file
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, num_classes=0)
  model.load_state_dict(load_file(str(encoder_file)), strict=True)

  junk = tmp_path / "junk.pth"
  torch.save({"alpha.weight": torch.zeros(3), "beta": torch.ones(2, 2)}, junk)
  result = run_convert("from_torch", junk, tmp_path / "junk.npz")
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "not a ViT" in lines[0] and "alpha.weight" in lines[0] and "beta" in lines[0]
  assert not (tmp_path / "junk.npz").exists()


def test_d2mae_training_workdir_exports_blocks_1_to_depth_to_timm(tmp_path, demo_data_dir):
  """A real D²-MAE run's workdir -> .pth: timm loads it strictly and computes what the
  trained student's blocks 1..depth compute (the extra block and mapping dropped)."""
  from conftest import make_teacher, tiny_distill_config
  from mim_jax.tasks.registry import build_task
  from mim_jax.trainer import loop
  config = tiny_distill_config(make_teacher(tmp_path / "teacher.npz"))
  config.total_steps = 1
  config.data.data_dir = demo_data_dir
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, build_task(config))
  summary = torch_io.export_to_torch(workdir, str(tmp_path / "student.pth"))
  assert any("blocks_2" in item for item in summary.dropped)
  assert any("distill" in item for item in summary.dropped)

  state_dict = torch.load(tmp_path / "student.pth", weights_only=True)
  assert not any(key.startswith("blocks.2.") for key in state_dict)
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
  model.load_state_dict(state_dict, strict=True)
  model.eval()
  trained = converted.load_converted(workdir)
  x = images(2, 32)
  features, _ = timm_outputs(model, x)
  encoder = VisionTransformer(patch_size=8, width=32, depth=2, num_heads=4)
  params = {k: v for k, v in trained.params["encoder"].items() if k != "blocks_2"}
  ours = jax.jit(encoder.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert_close(np.asarray(ours["tokens"]), features)
