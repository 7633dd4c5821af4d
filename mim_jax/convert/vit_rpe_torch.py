"""BEiT-style ViTs (relative position bias, q/v biases, layer scale) <-> PyTorch, in numpy.

`torch_format` converts timm's plain `VisionTransformer`; this module converts the
ViTs whose options it lacks: MAE-Lite's RPE fine-tuning model
(`projects/eval_tools/models_vit_rpe.py`, `vit_tiny_patch16_rpe`: a relative
position bias table per block, q and v biases, the absolute position embedding
kept) and SimMIM / BEiT encoders (a shared table, layer scale). Two layouts:

* timm's `Beit` (`timm.models.beit`), when it computes exactly what mim_jax does:
  q and v biases or none (`qkv_bias` 'qv' | 'none': timm's `qkv_bias=True` keeps k's
  bias at 0), any relative position bias, layer scale, pooling; loads with
  `strict=True` into `timm.create_model('beit_base_patch16_224', ...)` with every size
  overridden (`timm_create_call`);
* MAE-Lite's official `models_vit_rpe.VisionTransformer` otherwise, i.e. for a fused
  qkv bias (`qkv_bias=True, qv_bias=False`, as the released 79.4% D²-MAE model): the
  same keys plus `qkv.bias` and the persistent `relative_position_index` buffers.

The keys of both: `patch_embed.proj`, `cls_token`, `pos_embed`,
`rel_pos_bias.relative_position_bias_table` (shared), `blocks.{i}.norm1|norm2`,
`blocks.{i}.attn.qkv.weight`, `.q_bias` / `.v_bias` or `.qkv.bias`,
`blocks.{i}.attn.relative_position_bias_table`, `blocks.{i}.attn.proj`,
`blocks.{i}.mlp.fc1|fc2`, `blocks.{i}.gamma_1|gamma_2`, `norm` (cls pooling) or
`fc_norm` (mean pooling), `head`. Import reads either (and the official training
checkpoints' `model.` wrapper), checks any `relative_position_index` buffer against
the index mim_jax computes, and is strict about every other key.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mim_jax.convert.torch_format import (DROPPED_MODEL_PARTS, HEADS_BY_WIDTH, Entry,
                                          describe_arch, listing, strip_wrappers)
from mim_jax.errors import UserError
from mim_jax.models.attention import num_relative_distances, relative_position_index
from mim_jax.trainer.tree import shape_problems

TABLE = "relative_position_bias_table"
INDEX = "relative_position_index"
_TO_JAX = {"copy": lambda x: x, "linear": lambda x: x.T,
           "conv": lambda x: x.transpose(2, 3, 1, 0)}
_TO_TORCH = {"copy": lambda x: x, "linear": lambda x: x.T,
             "conv": lambda x: x.transpose(3, 2, 0, 1)}
OFFICIAL_SOURCE = "github.com/wangsr126/MAE-Lite projects/eval_tools/models_vit_rpe.py"


def handles(arch: dict[str, Any]) -> bool:
  """Whether an architecture needs this module (an option timm's plain ViT lacks)."""
  return (arch.get("qkv_bias", "qkv") != "qkv" or arch.get("rel_pos_bias", "none") != "none"
          or arch.get("layer_scale") is not None)


def layout(arch: dict[str, Any]) -> str:
  """'timm_beit' when timm's Beit computes this model exactly, else 'official'."""
  return "official" if arch.get("qkv_bias", "qkv") == "qkv" else "timm_beit"


def is_rpe_state_dict(state_dict: dict[str, Any]) -> bool:
  """Whether a (possibly wrapped) state_dict is a BEiT-style ViT this module imports."""
  return any(key.endswith((TABLE, ".attn.q_bias", ".gamma_1")) for key in state_dict)


def _grid(arch: dict[str, Any]) -> int:
  if arch["image_size"] % arch["patch_size"]:
    raise UserError(f"image size {arch['image_size']} is not divisible by patch size "
                    f"{arch['patch_size']}")
  return arch["image_size"] // arch["patch_size"]


def entries(arch: dict[str, Any], *, fc_norm: bool = True) -> list[Entry]:
  """Every parameter of the architecture, in the official module order (no buffers)."""
  width, patch, heads = arch["width"], arch["patch_size"], arch["num_heads"]
  hidden = int(width * arch["mlp_ratio"])
  rows = num_relative_distances(_grid(arch))
  enc = ("encoder",)

  def linear(key: str, path: tuple[str, ...], n_in: int, n_out: int,
             bias: bool = True) -> list[Entry]:
    out = [Entry(f"{key}.weight", path + ("kernel",), (n_out, n_in), "linear")]
    return out + ([Entry(f"{key}.bias", path + ("bias",), (n_out,))] if bias else [])

  def norm(key: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{key}.weight", path + ("scale",), (width,)),
            Entry(f"{key}.bias", path + ("bias",), (width,))]

  table = [Entry("patch_embed.proj.weight", enc + ("patch_embed", "proj", "kernel"),
                 (width, 3, patch, patch), "conv"),
           Entry("patch_embed.proj.bias", enc + ("patch_embed", "proj", "bias"), (width,)),
           Entry("cls_token", enc + ("cls_token",), (1, 1, width))]
  if arch["posemb"] == "learn":
    table.append(Entry("pos_embed", enc + ("pos_embed",), (1, 1 + _grid(arch)**2, width)))
  if arch["rel_pos_bias"] == "shared":
    table.append(Entry(f"rel_pos_bias.{TABLE}", enc + ("rel_pos_bias", TABLE), (rows, heads)))
  for i in range(arch["depth"]):
    key, path = f"blocks.{i}", enc + (f"blocks_{i}",)
    attn = path + ("attn",)
    if arch["layer_scale"] is not None:
      table += [Entry(f"{key}.gamma_1", path + ("gamma_1",), (width,)),
                Entry(f"{key}.gamma_2", path + ("gamma_2",), (width,))]
    table += norm(f"{key}.norm1", path + ("norm1",))
    if arch["qkv_bias"] == "qv":
      table += [Entry(f"{key}.attn.q_bias", attn + ("q_bias",), (width,)),
                Entry(f"{key}.attn.v_bias", attn + ("v_bias",), (width,))]
    table += linear(f"{key}.attn.qkv", attn + ("qkv",), width, 3 * width,
                    bias=arch["qkv_bias"] == "qkv")
    if arch["rel_pos_bias"] == "per_block":
      table.append(Entry(f"{key}.attn.{TABLE}", attn + (TABLE,), (rows, heads)))
    table += linear(f"{key}.attn.proj", attn + ("proj",), width, width)
    table += norm(f"{key}.norm2", path + ("norm2",))
    table += linear(f"{key}.mlp.fc1", path + ("mlp", "fc1"), width, hidden)
    table += linear(f"{key}.mlp.fc2", path + ("mlp", "fc2"), hidden, width)
  if arch["pool"] == "cls":
    table += norm("norm", enc + ("norm",))
  elif fc_norm:
    table += norm("fc_norm", enc + ("fc_norm",))
  if arch["num_classes"]:
    table += linear("head", enc + ("head",), width, arch["num_classes"])
  return table


def index_buffers(arch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The official model's persistent `relative_position_index` buffers (int64)."""
  index = relative_position_index(_grid(arch)).astype(np.int64)
  if arch["rel_pos_bias"] == "shared":
    return {f"rel_pos_bias.{INDEX}": index}
  if arch["rel_pos_bias"] == "per_block":
    # One array per block: safetensors refuses tensors that share memory.
    return {f"blocks.{i}.attn.{INDEX}": index.copy() for i in range(arch["depth"])}
  return {}


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if not hasattr(tree, "items"):
    return {prefix: tree}
  return {path: leaf for key, value in tree.items()
          for path, leaf in _leaves(value, prefix + (str(key),)).items()}


def state_dict_from_params(params: dict[str, Any], arch: dict[str, Any]
                           ) -> tuple[dict[str, np.ndarray], str]:
  """mim_jax params ({'encoder', ...}) -> (torch state_dict, layout), float32 (+ int64
  index buffers for the official layout). Only the encoder is exported; D²-MAE's
  extra block is not part of it.

  Raises:
    UserError: the encoder's leaves are not exactly the architecture's.
  """
  encoder = params["encoder"]
  fc_norm = "fc_norm" in encoder
  if arch["pool"] == "gap" and not fc_norm and layout(arch) == "timm_beit":
    raise UserError("a mean-pooling encoder without fc_norm (no head) has no timm Beit "
                    "equivalent; export a fine-tuned model")
  table = entries(arch, fc_norm=fc_norm)
  extra = f"blocks_{arch['depth']}" if arch.get("extra_attention_block") else None
  found = {"/".join(p): tuple(np.shape(v)) for p, v in _leaves(encoder, ("encoder",)).items()}
  expected = {"/".join(e.path): e.jax_shape for e in table}
  if arch["posemb"] == "sincos":  # a constant in mim_jax, a learned table in torch
    expected.pop("encoder/pos_embed", None)
  problems = shape_problems(found, expected,
                            ignore=lambda name: extra is not None and
                            name.startswith(f"encoder/{extra}/"))
  if problems:
    raise UserError(f"the params do not match their architecture ({describe_arch(arch)}): "
                    + "; ".join(f"{kind}: {listing(names)}" for kind, names in problems.items()))
  leaves = _leaves(params)
  state_dict = {e.key: np.ascontiguousarray(_TO_TORCH[e.kind](np.asarray(leaves[e.path],
                                                                         np.float32)))
                for e in table if e.path in leaves}
  if arch["posemb"] == "sincos":
    from mim_jax.convert.torch_format import sincos_table  # pylint: disable=g-import-not-at-top
    state_dict["pos_embed"] = sincos_table(arch["width"], _grid(arch))
  kind = layout(arch)
  if kind == "official":
    state_dict.update(index_buffers(arch))
  return state_dict, kind


def timm_model_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
  """kwargs of `timm.create_model('beit_base_patch16_224', **kwargs)` for a 'timm_beit'
  export: every size and option overridden, so the base name's own settings do not count."""
  return {"pretrained": False, "img_size": arch["image_size"],
          "patch_size": arch["patch_size"], "embed_dim": arch["width"],
          "depth": arch["depth"], "num_heads": arch["num_heads"],
          "mlp_ratio": arch["mlp_ratio"], "num_classes": arch["num_classes"],
          "global_pool": "avg" if arch["pool"] == "gap" else "token",
          "qkv_bias": arch["qkv_bias"] == "qv",
          # 0, not None, for no layer scale: create_model drops None kwargs, and the base
          # name's default is 0.1
          "init_values": arch["layer_scale"] or 0.0,
          "use_abs_pos_emb": arch["posemb"] != "none",
          "use_rel_pos_bias": arch["rel_pos_bias"] == "per_block",
          "use_shared_rel_pos_bias": arch["rel_pos_bias"] == "shared"}


def official_model_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
  """kwargs of MAE-Lite's `models_vit_rpe.VisionTransformer` (plus `norm_layer=
  partial(nn.LayerNorm, eps=1e-6)`, as its `vit_tiny_patch16_rpe`)."""
  return {"img_size": arch["image_size"], "patch_size": arch["patch_size"],
          "embed_dim": arch["width"], "depth": arch["depth"], "num_heads": arch["num_heads"],
          "mlp_ratio": arch["mlp_ratio"], "num_classes": arch["num_classes"],
          "qkv_bias": arch["qkv_bias"] != "none", "qv_bias": arch["qkv_bias"] == "qv",
          "init_values": arch["layer_scale"], "use_abs_pos_emb": arch["posemb"] != "none",
          "use_rel_pos_bias": arch["rel_pos_bias"] == "per_block",
          "use_shared_rel_pos_bias": arch["rel_pos_bias"] == "shared",
          "use_mean_pooling": arch["pool"] == "gap"}


def create_call(arch: dict[str, Any]) -> str:
  """The Python call that builds the torch model an export loads into with strict=True."""
  if layout(arch) == "timm_beit":
    args = ", ".join(f"{k}={v!r}" for k, v in timm_model_kwargs(arch).items())
    return f"timm.create_model('beit_base_patch16_224', {args})"
  args = ", ".join(f"{k}={v!r}" for k, v in official_model_kwargs(arch).items())
  return (f"models_vit_rpe.VisionTransformer({args}, norm_layer=partial(nn.LayerNorm, "
          f"eps=1e-6)) ({OFFICIAL_SOURCE})")


# ----------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------
def _shape(state_dict: dict[str, Any], key: str) -> tuple[int, ...] | None:
  return tuple(np.shape(state_dict[key])) if key in state_dict else None


def infer_arch(state_dict: dict[str, Any], *, num_heads: int | None = None,
               source: str = "") -> dict[str, Any]:
  """The architecture of a (stripped) BEiT-style state_dict; the strict check comes after."""
  where = f"{source}: " if source else ""
  proj = _shape(state_dict, "patch_embed.proj.weight")
  blocks = {int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, state_dict) if m}
  if proj is None or len(proj) != 4 or not blocks:
    raise UserError(f"{where}not a ViT state_dict (patch_embed.proj.weight {proj}, "
                    f"{len(blocks)} blocks)")
  width, patch = proj[0], proj[2]
  table = _shape(state_dict, f"blocks.0.attn.{TABLE}") or _shape(state_dict,
                                                                  f"rel_pos_bias.{TABLE}")
  pos = _shape(state_dict, "pos_embed")
  if pos is not None:
    grid = int(round((pos[1] - 1)**0.5))
  elif table is not None:  # (2g - 1)^2 + 3 rows
    grid = (int(round((table[0] - 3)**0.5)) + 1) // 2
  else:
    raise UserError(f"{where}neither pos_embed nor a relative position bias table: the "
                    f"patch grid is unknown")
  heads = table[1] if table is not None else (num_heads or HEADS_BY_WIDTH.get(width))
  if not heads or width % heads:
    raise UserError(f"{where}cannot tell the number of heads of width {width}: pass "
                    f"--num_heads")
  fc1 = _shape(state_dict, "blocks.0.mlp.fc1.weight") or (4 * width, width)
  head = _shape(state_dict, "head.weight")
  gamma = state_dict.get("blocks.0.gamma_1")
  return {
      "patch_size": patch, "image_size": grid * patch, "width": width,
      "depth": max(blocks) + 1, "num_heads": heads, "mlp_ratio": fc1[0] / width,
      "posemb": "learn" if pos is not None else "none",
      "pool": "gap" if "fc_norm.weight" in state_dict else "cls",
      "num_classes": head[0] if head else 0,
      "qkv_bias": ("qv" if "blocks.0.attn.q_bias" in state_dict else
                   "qkv" if "blocks.0.attn.qkv.bias" in state_dict else "none"),
      "rel_pos_bias": ("per_block" if f"blocks.0.attn.{TABLE}" in state_dict else
                       "shared" if f"rel_pos_bias.{TABLE}" in state_dict else "none"),
      # Only the init of fresh gammas; the imported ones are loaded as they are.
      "layer_scale": None if gamma is None else float(np.mean(np.asarray(gamma))),
      "extra_attention_block": False, "decoder": None, "source": source,
  }


def import_state_dict(state_dict: dict[str, Any], *, num_heads: int | None = None,
                      source: str = "") -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """A timm Beit / MAE-Lite models_vit_rpe state_dict -> (params, arch, dropped lines).

  Raises:
    UserError: a missing / unexpected key, a shape mismatch, or a relative position
      index other than the one mim_jax computes (it would be another function).
  """
  state_dict, dropped = strip_wrappers(dict(state_dict))
  parts = [k for k in state_dict if k.startswith(tuple(DROPPED_MODEL_PARTS))]
  if parts:
    dropped.append(f"DeiT-style distillation head (logits are those of `head`): "
                   f"{listing(parts, 4)}")
  state_dict = {k: v for k, v in state_dict.items() if k not in parts}
  arch = infer_arch(state_dict, num_heads=num_heads, source=source)
  table = entries(arch)
  buffers = index_buffers(arch)
  for key, index in buffers.items():
    if key in state_dict and not np.array_equal(np.asarray(state_dict[key]), index):
      raise UserError(f"{source + ': ' if source else ''}{key} is not the BEiT / MAE-Lite "
                      f"relative position index of a {_grid(arch)}x{_grid(arch)} grid")
  found = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k not in buffers}
  problems = shape_problems(found, {e.key: e.shape for e in table})
  if problems:
    raise UserError(f"{source + ': ' if source else ''}the state_dict does not match the "
                    f"BEiT-style ViT its shapes describe ({describe_arch(arch)}): "
                    + "; ".join(f"{kind}: {listing(names)}" for kind, names in problems.items()))
  params: dict[str, Any] = {}
  for entry in table:
    node = params
    for part in entry.path[:-1]:
      node = node.setdefault(part, {})
    value = np.asarray(state_dict[entry.key], np.float32)
    node[entry.path[-1]] = np.ascontiguousarray(_TO_JAX[entry.kind](value))
  return params, arch, dropped
