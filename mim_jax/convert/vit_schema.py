"""The ViT's PyTorch schema: one table of entries from the architecture, for both directions.

Each `Entry` names a torch state_dict key, its torch shape, the mim_jax param path
and the layout change (Dense kernel = weight.T; Conv kernel (p, p, 3, d) = weight
(d, 3, p, p) transposed). `encoder_entries` / `decoder_entries` build the table for
timm's `VisionTransformer` and MAE's decoder; `torch_format` imports and exports
through it. Pure numpy: no torch here.
"""

import dataclasses
from typing import Any, Callable

import numpy as np

from mim_jax.errors import UserError
from mim_jax.models import posembed

# Heads cannot be read off the weights. Encoder: MAE-Lite's convention (ViT-Tiny and
# -Small with 12 heads; mim_jax.models.vit.VARIANTS). Decoder: MAE's 512-wide
# decoder has 16 heads, MAE-Lite's Tiny decoder (96) 3 and its Small decoder (192) 6
# (MAE-Lite projects/mae_lite/models_mae.py).
HEADS_BY_WIDTH = {192: 12, 384: 12, 768: 12, 1024: 16}
DECODER_HEADS_BY_WIDTH = {96: 3, 192: 6, 512: 16}
SINCOS_ATOL = 1e-5
TIMM_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}

# Modules that MAE-Lite's training wrappers keep beside `model.`; never imported.
WRAPPER_SIBLINGS = {
    "tch_model.": "distillation teacher",
    "attn_adapter.": "attention-distillation head mapping",
    "hidden_adapter.": "representation-distillation mapping",
    "ema_model.": "EMA copy of the model",
}
# Keys inside the model that mim_jax cannot use.
DROPPED_MODEL_PARTS = {
    "dist_norm.": "DeiT-style distillation norm of a fine-tuned model",
    "head_dist.": "DeiT-style distillation head (logits are those of `head` alone)",
}
_LIST_LIMIT = 10


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch tensor <-> one mim_jax leaf."""
  key: str  # torch state_dict key
  path: tuple[str, ...]  # mim_jax param path
  shape: tuple[int, ...]  # torch shape
  kind: str = "copy"  # 'copy', 'linear' (weight.T) or 'conv' ((d,3,p,p) <-> (p,p,3,d))

  @property
  def jax_shape(self) -> tuple[int, ...]:
    """The mim_jax leaf's shape."""
    if self.kind == "linear":
      return tuple(reversed(self.shape))
    if self.kind == "conv":
      return tuple(self.shape[i] for i in (2, 3, 1, 0))
    return self.shape


@dataclasses.dataclass(frozen=True)
class ImportResult:
  params: dict[str, Any]
  arch: dict[str, Any]
  dropped: list[str]  # one line per group of keys that was not imported
  notes: list[str] = dataclasses.field(default_factory=list)  # defaults that were assumed


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def listing(names: Any, limit: int = _LIST_LIMIT) -> str:
  """'a, b, c' for the first `limit` names, then '... (N in all)'."""
  names = sorted(names)
  shown = ", ".join(names[:limit])
  return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _where(source: str) -> str:
  return f"{source}: " if source else ""


def _to_jax(kind: str) -> Callable[[np.ndarray], np.ndarray]:
  return {"copy": lambda x: x, "linear": lambda x: x.T,
          "conv": lambda x: x.transpose(2, 3, 1, 0)}[kind]


def _to_torch(kind: str) -> Callable[[np.ndarray], np.ndarray]:
  return {"copy": lambda x: x, "linear": lambda x: x.T,
          "conv": lambda x: x.transpose(3, 2, 0, 1)}[kind]


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  node: Any = tree
  for part in path:
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  node = tree
  for part in path[:-1]:
    node = node.setdefault(part, {})
  node[path[-1]] = value


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  if not isinstance(tree, dict):
    return [prefix]
  return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (k,))]


def grid_size(arch: dict[str, Any]) -> int:
  if arch["image_size"] % arch["patch_size"]:
    raise UserError(f"image size {arch['image_size']} is not divisible by patch size "
                    f"{arch['patch_size']}")
  return arch["image_size"] // arch["patch_size"]


def sincos_table(width: int, grid: int) -> np.ndarray:
  """(1, 1 + grid**2, width) float32, zero cls slot first (MAE's fixed table)."""
  return posembed.sincos_2d(width, grid, cls_token=True)[None]


def _is_sincos(table: np.ndarray, grid: int) -> bool:
  width = table.shape[-1]
  if width % 4:
    return False
  return float(np.max(np.abs(table - sincos_table(width, grid)))) <= SINCOS_ATOL


# ----------------------------------------------------------------------------
# The table of entries, from the architecture
# ----------------------------------------------------------------------------
def _linear(key: str, path: tuple[str, ...], n_in: int, n_out: int) -> list[Entry]:
  return [Entry(f"{key}.weight", path + ("kernel",), (n_out, n_in), "linear"),
          Entry(f"{key}.bias", path + ("bias",), (n_out,))]


def _norm(key: str, path: tuple[str, ...], width: int) -> list[Entry]:
  return [Entry(f"{key}.weight", path + ("scale",), (width,)),
          Entry(f"{key}.bias", path + ("bias",), (width,))]


def _block(key: str, path: tuple[str, ...], width: int, hidden: int,
           attention_only: bool = False) -> list[Entry]:
  entries = _norm(f"{key}.norm1", path + ("norm1",), width)
  entries += _linear(f"{key}.attn.qkv", path + ("attn", "qkv"), width, 3 * width)
  if attention_only:
    return entries
  entries += _linear(f"{key}.attn.proj", path + ("attn", "proj"), width, width)
  entries += _norm(f"{key}.norm2", path + ("norm2",), width)
  entries += _linear(f"{key}.mlp.fc1", path + ("mlp", "fc1"), width, hidden)
  entries += _linear(f"{key}.mlp.fc2", path + ("mlp", "fc2"), hidden, width)
  return entries


def _hidden(width: int, mlp_ratio: float) -> int:
  return int(width * mlp_ratio)


def encoder_entries(arch: dict[str, Any], *, fc_norm: bool = True,
                    extra_block: bool = True) -> list[Entry]:
  """Encoder entries except `pos_embed` (a constant or a param, handled apart).

  `fc_norm`: whether a pool='gap' encoder has its `fc_norm` (mim_jax creates it only
  with a head; timm always). `extra_block`: include D²-MAE's attention-only block.
  """
  width, patch = arch["width"], arch["patch_size"]
  enc = ("encoder",)
  hidden = _hidden(width, arch["mlp_ratio"])
  entries = [Entry("patch_embed.proj.weight", enc + ("patch_embed", "proj", "kernel"),
                   (width, 3, patch, patch), "conv"),
             Entry("patch_embed.proj.bias", enc + ("patch_embed", "proj", "bias"), (width,)),
             Entry("cls_token", enc + ("cls_token",), (1, 1, width))]
  for i in range(arch["depth"]):
    entries += _block(f"blocks.{i}", enc + (f"blocks_{i}",), width, hidden)
  if arch["extra_attention_block"] and extra_block:
    depth = arch["depth"]
    entries += _block(f"blocks.{depth}", enc + (f"blocks_{depth}",), width, hidden,
                      attention_only=True)
  if arch["pool"] == "cls":
    entries += _norm("norm", enc + ("norm",), width)
  elif fc_norm:
    entries += _norm("fc_norm", enc + ("fc_norm",), width)
  if arch["num_classes"]:
    entries += _linear("head", enc + ("head",), width, arch["num_classes"])
  return entries


def decoder_entries(arch: dict[str, Any]) -> list[Entry]:
  """MAE decoder entries except `decoder_pos_embed` (always the sin-cos constant)."""
  decoder = arch["decoder"]
  width, dec = decoder["width"], ("decoder",)
  hidden = _hidden(width, arch["mlp_ratio"])
  entries = _linear("decoder_embed", dec + ("embed",), arch["width"], width)
  entries.append(Entry("mask_token", dec + ("mask_token",), (1, 1, width)))
  for i in range(decoder["depth"]):
    entries += _block(f"decoder_blocks.{i}", dec + (f"blocks_{i}",), width, hidden)
  entries += _norm("decoder_norm", dec + ("norm",), width)
  entries += _linear("decoder_pred", dec + ("pred",), width, arch["patch_size"]**2 * 3)
  return entries


# ----------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------
def timm_model_name(arch: dict[str, Any]) -> str:
  """A registered timm ViT name for the arch; `timm_model_kwargs` sets every size anyway."""
  base = TIMM_NAMES.get(arch["width"], "vit_base")
  return f"{base}_patch16_224"


def timm_model_kwargs(arch: dict[str, Any], *, fc_norm: bool = True) -> dict[str, Any]:
  """kwargs for `timm.create_model(timm_model_name(arch), **kwargs)` that loads the
  exported state_dict with strict=True and computes what mim_jax computes.

  `fc_norm=False`: a pool='gap' encoder without `fc_norm` (mim_jax creates it only
  with a head): timm then needs `final_norm=False` (neither `norm` nor `fc_norm`).
  """
  kwargs = {
      "pretrained": False,
      "img_size": arch["image_size"], "patch_size": arch["patch_size"],
      "embed_dim": arch["width"], "depth": arch["depth"], "num_heads": arch["num_heads"],
      "mlp_ratio": arch["mlp_ratio"], "num_classes": arch["num_classes"],
      "global_pool": "avg" if arch["pool"] == "gap" else "token",
  }
  if arch["pool"] == "gap" and not fc_norm:
    kwargs["final_norm"] = False
  return kwargs


def timm_create_call(arch: dict[str, Any], *, fc_norm: bool = True) -> str:
  """The `timm.create_model(...)` call, as Python source, for summaries."""
  args = ", ".join(f"{k}={v!r}" for k, v in timm_model_kwargs(arch, fc_norm=fc_norm).items())
  return f"timm.create_model({timm_model_name(arch)!r}, {args})"
