"""The ViT backbone ('vit'): config checks, construction, layer ids, FLOPs, for the registry.

`config.model` of a ViT (see `config_defaults.vit_model_config`): `variant`
(tiny | small | base | large) or `width` / `depth` / `num_heads`, `patch_size`,
`mlp_ratio`, compute `dtype`, `remat`, `scan_blocks`, `attention_impl`. The
module is `models.vit.VisionTransformer`; its PyTorch converter is
`mim_jax.convert.torch_format` (timm's `VisionTransformer` layout).
"""

import re
from typing import Any

import flax.linen as nn

from mim_jax import flops
from mim_jax.errors import ConfigError
from mim_jax.models import attention, layers, registry, vit

# Top-level encoder names that belong to layer 0 (MAE `get_layer_id_for_vit`).
EMBEDDING_NAMES = frozenset({"patch_embed", "cls_token", "pos_embed", "mask_token"})
_BLOCK = re.compile(r"blocks_(\d+)")
# Keys of an architecture description that select the module (the rest describe
# where the weights came from, or the MAE decoder).
ARCH_MODULE_KEYS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "posemb", "pool",
                    "num_classes", "qkv_bias", "rel_pos_bias", "layer_scale")
# `config.model` keys that are module fields as they are (older configs lack some).
OPTION_DEFAULTS = {"mlp_ratio": 4.0, "remat": "none", "scan_blocks": False,
                   "qkv_bias": "qkv", "rel_pos_bias": "none", "layer_scale": None,
                   "weight_init": "mae", "drop_path_rate": 0.0}


def shape_of(variant: str | None, **overrides: Any) -> dict[str, Any]:
  """{'width', 'depth', 'num_heads'}: a named variant plus overrides (None = keep)."""
  shape: dict[str, Any] = {}
  if variant:
    if variant not in vit.VARIANTS:
      raise ConfigError(f"model.variant={variant!r} is unknown; choose from "
                        f"{sorted(vit.VARIANTS)} (or set model.width/depth/num_heads)")
    shape.update(vit.VARIANTS[variant])
  shape.update({k: v for k, v in overrides.items() if v is not None})
  return shape


class ViT(registry.Backbone):
  """Vision Transformer with a cls token (timm / MAE layout)."""

  name = "vit"

  def shape(self, model_config: Any) -> dict[str, int]:
    return shape_of(model_config.get("variant") or None, width=model_config.get("width"),
                    depth=model_config.get("depth"), num_heads=model_config.get("num_heads"))

  def validate(self, model_config: Any, image_size: int) -> None:
    shape = self.shape(model_config)
    for key in ("width", "depth", "num_heads"):
      if key not in shape:
        raise ConfigError(f"model.{key} is not set and model.variant is empty")
      if not isinstance(shape[key], int) or shape[key] < 1:
        raise ConfigError(f"model.{key}={shape[key]!r} must be a positive integer")
    if shape["width"] % shape["num_heads"]:
      raise ConfigError(f"model width {shape['width']} is not divisible by num_heads "
                        f"{shape['num_heads']}")
    patch = model_config["patch_size"]
    if not isinstance(patch, int) or patch < 1:
      raise ConfigError(f"model.patch_size={patch!r} must be a positive integer")
    if image_size % patch:
      raise ConfigError(f"image_size={image_size} is not divisible by model.patch_size={patch}")
    if model_config.get("mlp_ratio", 4.0) <= 0:
      raise ConfigError(f"model.mlp_ratio={model_config['mlp_ratio']} must be positive")
    registry.compute_dtype(model_config["dtype"], "model.dtype")
    impl = registry.attention_impl(model_config)
    if impl not in vit.ATTENTION_IMPLS:
      raise ConfigError(f"model.attention_impl={impl!r} is unknown; choose from "
                        f"{vit.ATTENTION_IMPLS}")
    registry.check_attention_dtype(model_config, registry.compute_dtype(model_config["dtype"]),
                                   "model.dtype")
    remat = model_config.get("remat", "none")
    if remat not in vit.REMAT_POLICIES:
      raise ConfigError(f"model.remat={remat!r} is unknown; choose from "
                        f"{sorted(vit.REMAT_POLICIES)}")
    if not isinstance(model_config.get("scan_blocks", False), bool):
      raise ConfigError(f"model.scan_blocks={model_config['scan_blocks']!r} must be True or False")
    for key, allowed in (("qkv_bias", attention.QKV_BIASES),
                         ("rel_pos_bias", attention.REL_POS_BIASES),
                         ("weight_init", layers.WEIGHT_INITS)):
      value = model_config.get(key, OPTION_DEFAULTS[key])
      if value not in allowed:
        raise ConfigError(f"model.{key}={value!r} is unknown; choose from {allowed}")
    scale = model_config.get("layer_scale")
    if scale is not None and not scale > 0:
      raise ConfigError(f"model.layer_scale={scale!r} must be positive, or None for none")
    rate = model_config.get("drop_path_rate", 0.0)
    if not 0.0 <= rate < 1.0:
      raise ConfigError(f"model.drop_path_rate={rate} must be in [0, 1)")

  def options(self, model_config: Any) -> dict[str, Any]:
    """The module fields `config.model` sets (defaults for keys older configs lack)."""
    return {key: model_config.get(key, default) for key, default in OPTION_DEFAULTS.items()}

  def build(self, model_config: Any, **role: Any) -> vit.VisionTransformer:
    """Role: posemb ('sincos' | 'learn'; 'none' when model.abs_pos_embed is False), pool,
    num_classes, mask_token, extra_attention_block, ..., any `VisionTransformer` field."""
    kwargs = dict(patch_size=model_config["patch_size"],
                  dtype=registry.compute_dtype(model_config["dtype"], "model.dtype"),
                  attention_impl=registry.attention_impl(model_config),
                  **self.options(model_config), **self.shape(model_config))
    kwargs.update(role)
    if not model_config.get("abs_pos_embed", True):
      kwargs["posemb"] = "none"
    return vit.VisionTransformer(**kwargs)

  def arch(self, model_config: Any, image_size: int, **role: Any) -> dict[str, Any]:
    """Role: posemb ('sincos'), pool ('cls'), num_classes (0), extra_attention_block."""
    options = self.options(model_config)
    arch = {"backbone": self.name, "patch_size": model_config["patch_size"],
            "image_size": image_size, **self.shape(model_config),
            "mlp_ratio": options["mlp_ratio"], "posemb": "sincos", "pool": "cls",
            "num_classes": 0, "extra_attention_block": False,
            **{k: options[k] for k in ("qkv_bias", "rel_pos_bias", "layer_scale")}, **role}
    if not model_config.get("abs_pos_embed", True):
      arch["posemb"] = "none"
    return arch

  def build_from_arch(self, arch: dict[str, Any], **role: Any) -> vit.VisionTransformer:
    kwargs = {k: arch.get(k, OPTION_DEFAULTS.get(k)) for k in ARCH_MODULE_KEYS}
    kwargs.update(role)
    return vit.VisionTransformer(**kwargs)

  def num_layers(self, arch: dict[str, Any]) -> int:
    return arch["depth"]

  def layer_id(self, path: str, num_layers: int) -> int:
    """MAE's `get_layer_id_for_vit` on a mim_jax param path.

    Patch embedding, cls / mask token and position embedding -> 0; `blocks_{i}` ->
    i + 1; anything else (`norm`, `fc_norm`, `head`, ...) -> num_layers + 1. A leading
    `params/` and/or `encoder/` is ignored, so encoder trees and wrapped trees both work.

    Raises:
      ConfigError: a `blocks_{i}` with i >= num_layers (the tree has more blocks than
        the depth, e.g. D²-MAE's attention-only block, which fine-tuning drops).
    """
    parts = path.split("/")
    for prefix in ("params", "encoder"):
      if len(parts) > 1 and parts[0] == prefix:
        parts = parts[1:]
    top = parts[0]
    if top in EMBEDDING_NAMES:
      return 0
    block = _BLOCK.fullmatch(top)
    if block:
      index = int(block.group(1))
      if index >= num_layers:
        raise ConfigError(f"param {path!r} is block {index + 1} but the model depth is "
                          f"{num_layers}; set the right depth or drop extra blocks (D²-MAE's "
                          f"13th) first")
      return index + 1
    return num_layers + 1

  def token_layout(self, arch: dict[str, Any], image_size: int) -> registry.TokenLayout:
    """The cls token, then the patches of a square grid in raster order."""
    grid = image_size // arch["patch_size"]
    return registry.TokenLayout(1, (grid, grid), arch["patch_size"])

  def forward_flops(self, arch: dict[str, Any], num_patches: int) -> float:
    return flops.vit_encoder_flops(num_patches, arch["patch_size"], arch["width"],
                                   arch["depth"], arch.get("mlp_ratio", 4.0))


def module_arch(module: nn.Module) -> dict[str, Any]:
  """The architecture fields of a built `VisionTransformer`."""
  return {k: getattr(module, k) for k in ARCH_MODULE_KEYS}


VIT = registry.register(ViT())
