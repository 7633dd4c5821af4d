"""RPE fine-tuning (MAE-Lite's `models_vit_rpe`, `finetuning_rpe_exp.py`): attention logits
and outputs against a float64 torch transcription of the official model on fixed weights,
export to timm's Beit (strict) or the official layout, the layer-decay and weight-decay
groups against the official assignment, and loading a pre-trained encoder into it."""


import jax
import numpy as np
import pytest

from conftest import shipped_config, tiny_config
from mim_jax.convert import (Converted, arch_from_config, content_hash, load_converted,
                             save_converted, torch_io, vit_rpe_torch)
from mim_jax.convert.pretrained import init_encoder_from
from mim_jax.models import scan
from mim_jax.tasks.base import normalize_images
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import optim
from mim_jax.trainer.tree import flatten_with_names

def finetune_config(arg):
  return shipped_config("finetune_vit_tiny.py", arg)


def rpe_config(**model):
  """`:rpe,demo` (digits, 32 px, patch 8: a 4x4 grid) shrunk to 2 blocks of width 32."""
  config = finetune_config("rpe,demo")
  config.model.update(variant="", width=32, depth=2, num_heads=4, **model)
  return config


def perturbed_params(task, seed=0):
  """Init params plus noise on every leaf: tables, q/v biases, norms all non-trivial."""
  params = task.init_params(jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed + 100)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                      .astype(np.float32), params)


def official_relative_position_index(torch, window_size):
  """`Attention.__init__` / `RelativePositionBias.__init__` of models_vit_rpe.py."""
  num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
  coords_h = torch.arange(window_size[0])
  coords_w = torch.arange(window_size[1])
  coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))
  coords_flatten = torch.flatten(coords, 1)
  relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
  relative_coords = relative_coords.permute(1, 2, 0).contiguous()
  relative_coords[:, :, 0] += window_size[0] - 1
  relative_coords[:, :, 1] += window_size[1] - 1
  relative_coords[:, :, 0] *= 2 * window_size[1] - 1
  index = torch.zeros(size=(window_size[0] * window_size[1] + 1,) * 2,
                      dtype=relative_coords.dtype)
  index[1:, 1:] = relative_coords.sum(-1)
  index[0, 0:] = num_relative_distance - 3
  index[0:, 0] = num_relative_distance - 2
  index[0, 0] = num_relative_distance - 1
  return index


def official_forward(torch, sd, images, *, patch, heads, mean_pooling):
  """models_vit_rpe.VisionTransformer.forward in eval mode, float64, from an official
  state_dict: (logits, [pre-softmax attention of every block])."""
  f = torch.nn.functional
  sd = {k: torch.tensor(np.asarray(v), dtype=torch.float64) if v.dtype != np.int64
        else torch.tensor(v) for k, v in sd.items()}
  ln = lambda x, key: f.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"],
                                   eps=1e-6)
  x = f.conv2d(images.permute(0, 3, 1, 2), sd["patch_embed.proj.weight"],
               sd["patch_embed.proj.bias"], stride=patch)
  x = x.flatten(2).transpose(1, 2)
  grid = images.shape[1] // patch
  b, n = x.shape[0], grid * grid + 1
  x = torch.cat((sd["cls_token"].expand(b, -1, -1), x), dim=1)
  if "pos_embed" in sd:
    x = x + sd["pos_embed"]
  index = official_relative_position_index(torch, (grid, grid))

  def table_bias(table):
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

  shared = (table_bias(sd["rel_pos_bias.relative_position_bias_table"])
            if "rel_pos_bias.relative_position_bias_table" in sd else None)
  attns = []
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    key = f"blocks.{i}"
    shortcut, h = x, ln(x, f"{key}.norm1")
    if f"{key}.attn.q_bias" in sd:
      bias = torch.cat((sd[f"{key}.attn.q_bias"], torch.zeros_like(sd[f"{key}.attn.v_bias"]),
                        sd[f"{key}.attn.v_bias"]))
    else:
      bias = sd.get(f"{key}.attn.qkv.bias")
    qkv = f.linear(h, sd[f"{key}.attn.qkv.weight"], bias)
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (x.shape[-1] // heads)**-0.5
    attn = q @ k.transpose(-2, -1)
    if f"{key}.attn.relative_position_bias_table" in sd:
      attn = attn + table_bias(sd[f"{key}.attn.relative_position_bias_table"]).unsqueeze(0)
    if shared is not None:
      attn = attn + shared
    attns.append(attn)
    h = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    h = f.linear(h, sd[f"{key}.attn.proj.weight"], sd[f"{key}.attn.proj.bias"])
    x = shortcut + (sd[f"{key}.gamma_1"] * h if f"{key}.gamma_1" in sd else h)
    h = f.linear(ln(x, f"{key}.norm2"), sd[f"{key}.mlp.fc1.weight"], sd[f"{key}.mlp.fc1.bias"])
    h = f.linear(f.gelu(h), sd[f"{key}.mlp.fc2.weight"], sd[f"{key}.mlp.fc2.bias"])
    x = x + (sd[f"{key}.gamma_2"] * h if f"{key}.gamma_2" in sd else h)
  outcome = ln(x[:, 1:, :].mean(1), "fc_norm") if mean_pooling else ln(x, "norm")[:, 0]
  return f.linear(outcome, sd["head.weight"], sd["head.bias"]), attns


CASES = [("qv", "per_block", "timm_beit"), ("qkv", "per_block", "official"),
         ("qv", "shared", "timm_beit")]


@pytest.mark.parametrize("qkv_bias, rel_pos_bias, layout", CASES)
def test_rpe_model_and_export_match_the_official_model(qkv_bias, rel_pos_bias, layout):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  config = rpe_config(qkv_bias=qkv_bias, rel_pos_bias=rel_pos_bias)
  task = build_task(config)
  params = perturbed_params(task)
  images = np.random.RandomState(1).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  normed = np.array(normalize_images(images))  # writable: torch.from_numpy shares it
  out = jax.jit(lambda p, x: task.model.apply({"params": scan.apply_layout(p, task.model)}, x,
                                              capture_layers=(1, 2)))(params, normed)

  arch = arch_from_config(config.to_dict())
  state_dict, kind = vit_rpe_torch.state_dict_from_params({"encoder": params}, arch)
  assert kind == layout
  assert ("blocks.0.attn.qkv.bias" in state_dict) == (qkv_bias == "qkv")
  assert ("blocks.0.attn.relative_position_index" in state_dict) == (layout == "official")
  with torch.no_grad():
    logits, attns = official_forward(torch, state_dict, torch.tensor(normed, dtype=torch.float64),
                                     patch=8, heads=4, mean_pooling=True)
  assert np.abs(logits.numpy()).max() > 0.5
  np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
  for layer, attn in zip((1, 2), attns):
    np.testing.assert_allclose(out["attn_logits"][layer], attn.numpy(), rtol=1e-4, atol=1e-5)

  if layout == "timm_beit":  # timm's Beit loads it strictly and computes the same
    model = timm.create_model("beit_base_patch16_224", **vit_rpe_torch.timm_model_kwargs(arch))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
      timm_logits = model.eval()(torch.from_numpy(normed).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(out["logits"], timm_logits, rtol=1e-4, atol=1e-5)
  # Import is the inverse, bit for bit.
  imported, imported_arch, _ = vit_rpe_torch.import_state_dict(state_dict, source="test")
  for name, value in flatten_with_names(imported["encoder"]).items():
    np.testing.assert_array_equal(value, flatten_with_names(params)[name], err_msg=name)
  for key in ("qkv_bias", "rel_pos_bias", "posemb", "pool", "num_classes", "num_heads"):
    assert imported_arch[key] == arch[key], key


def official_layer_id(var_name, num_max_layer):
  """MAE-Lite's `get_num_layer_for_vit` (projects/eval_tools/util/lr_decay.py)."""
  if var_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  elif var_name.startswith("patch_embed"):
    return 0
  elif var_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  elif var_name.startswith("blocks"):
    return int(var_name.split(".")[1]) + 1
  else:
    return num_max_layer - 1


@pytest.mark.parametrize("rel_pos_bias", ["per_block", "shared"])
def test_layer_and_weight_decay_groups_are_the_officials(rel_pos_bias):
  config = rpe_config(rel_pos_bias=rel_pos_bias)
  task = build_task(config)
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  ids, num_layers = task.layer_ids(params)
  scales = optim.lr_scales_from_layer_ids(ids, num_layers, 0.85)
  decays = flatten_with_names(task.weight_decay_mask(params))
  ids, scales = flatten_with_names(ids), flatten_with_names(scales)
  # finetuning_mae_exp.get_optimizer: values[i] = decay ** (num_layers + 1 - i).
  values = [0.85**(num_layers + 1 - i) for i in range(num_layers + 2)]
  skip_list = {"pos_embed", "cls_token"}  # models_vit_rpe.VisionTransformer.no_weight_decay()
  table = vit_rpe_torch.entries(arch_from_config(config.to_dict()))
  assert len(table) == len(ids)
  for entry in table:
    name = "/".join(entry.path[1:])
    layer = official_layer_id(entry.key, len(values))
    assert ids[name] == layer, (entry.key, ids[name], layer)
    assert scales[name] == pytest.approx(values[layer]), entry.key
    no_decay = len(entry.shape) == 1 or entry.key.endswith(".bias") or entry.key in skip_list
    assert decays[name] == (not no_decay), entry.key
  tables = [e.key for e in table if "relative_position_bias_table" in e.key]
  assert tables and all(decays["/".join(e.path[1:])] for e in table if e.key in tables)


def pretrained_source(config, path="pretrain-run"):
  params = jax.tree.map(np.asarray, build_task(config).init_params(jax.random.PRNGKey(3)))
  return Converted(params=params, arch=arch_from_config(config.to_dict(), source="test"),
                   sha256=content_hash(params), path=path)


def test_pretrained_encoder_loads_with_fresh_tables_and_qv_biases():
  source = pretrained_source(tiny_config())  # MAE pre-training: fused qkv bias, no tables
  task = build_task(rpe_config())
  fresh = jax.tree.map(np.asarray, task.init_params(jax.random.PRNGKey(0)))
  params, report = init_encoder_from(fresh, source)
  got, pre = flatten_with_names(params), flatten_with_names(source.params["encoder"])
  new_leaves = [n for n in got if n.endswith(("relative_position_bias_table", "q_bias", "v_bias"))]
  assert len(new_leaves) == 2 * 3
  for name in new_leaves:  # fresh, at the official init (zeros), and the log says so
    np.testing.assert_array_equal(got[name], 0.0)
    assert any(line.startswith(f"{name} (new: ") for line in report.fresh), name
  assert "blocks_0/attn/qkv/bias" in report.dropped
  for name in got:
    if name in pre and not name.startswith(("head/", "fc_norm/")):
      np.testing.assert_array_equal(got[name], pre[name], err_msg=name)
  # A fused-bias model from a q/v-bias source: [q, 0, v], the same function.
  qv_source = Converted(params={"encoder": params}, arch=arch_from_config(
      rpe_config().to_dict()), sha256="", path="rpe-run")
  qv_source.params["encoder"]["blocks_1"]["attn"]["q_bias"] = np.full(32, 0.5, np.float32)
  qkv_task = build_task(rpe_config(qkv_bias="qkv"))
  fused, report = init_encoder_from(
      jax.tree.map(np.asarray, qkv_task.init_params(jax.random.PRNGKey(0))), qv_source)
  np.testing.assert_array_equal(fused["blocks_1"]["attn"]["qkv"]["bias"],
                                np.concatenate([np.full(32, 0.5), np.zeros(64)]))
  assert not any("q_bias" in name for name in report.dropped)


def test_converter_round_trips_an_rpe_model_through_torch_files(tmp_path):
  """`python -m mim_jax.convert to_torch / from_torch` on an RPE model: the official layout
  for a fused qkv bias (with its index buffers), and back to the same params."""
  pytest.importorskip("safetensors.torch")
  config = rpe_config(qkv_bias="qkv")
  params = perturbed_params(build_task(config))
  path = str(tmp_path / "rpe.npz")
  save_converted(path, {"encoder": params}, arch_from_config(config.to_dict(), source="t"))
  summary = torch_io.export_to_torch(path, str(tmp_path / "rpe.safetensors"))
  assert "models_vit_rpe.VisionTransformer(" in summary.timm_call
  assert "qv_bias=False" in summary.timm_call and "strict=True" in summary.timm_call
  back = str(tmp_path / "back.npz")
  torch_io.convert_from_torch(str(tmp_path / "rpe.safetensors"), back)
  restored = flatten_with_names(load_converted(back).params["encoder"])
  assert set(restored) == set(flatten_with_names(params))
  for name, value in flatten_with_names(params).items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
