"""Backbones by name: `config.model.name` -> what the rest of mim_jax may know about it.

Tasks, the optimizer rules, the converter, the FLOPs count and the analysis tools
ask the backbone, never a model's internals:

* `validate(model_config, image_size)` and `shape(model_config)`;
* `build(model_config, **role)` -> a Flax module whose `__call__(images, ...)`
  returns the one output interface of every backbone: a dict with 'tokens'
  (B, N, d), 'pooled' and 'logits' when it has a head, 'attn_logits' and
  'hidden' ({layer: array} for the `capture_layers` asked for: pre-softmax
  attention logits (B, h, N, N) and normalised representations (B, N, d));
* `arch` descriptions (the JSON stored beside converted weights) and
  `build_from_arch(arch, **role)`;
* `layer_id(path, num_layers)` for layer-wise lr decay, `num_layers(arch)`;
* `forward_flops(arch, num_patches)`, `token_layout(arch, image_size)` (prefix tokens
  and the patch grid, for the analyses);
* its scan layout (`apply_layout`, `unscanned`) and its PyTorch converter
  (`torch_format`).

`role` keyword arguments say what a task needs of the backbone (position
embedding, pooling, a head, stochastic depth, a mask-token input, ...).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str | None, key: str = "model.dtype") -> Any:
  """A config's compute dtype ('float32' | 'bfloat16') as a jnp dtype; errors name `key`.

  float16 would need loss scaling, so it is refused; params stay float32 either way.
  """
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"{key}={name!r} is not a compute dtype; choose from "
                      f"{COMPUTE_DTYPES} (params stay float32 either way)")
  return jnp.dtype(name)


def attention_impl(model_config: Any) -> str:
  """model.attention_impl ('explicit' when the config predates it)."""
  return model_config.get("attention_impl", "explicit")


def check_attention_dtype(model_config: Any, dtype: Any, key: str) -> None:
  """cuDNN's fused attention needs a GPU and bfloat16 compute for every part using it."""
  if attention_impl(model_config) != "cudnn":
    return
  if jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' needs a GPU, but JAX runs on "
                      f"{jax.default_backend()!r}; use 'xla' or 'explicit'")
  if dtype != jnp.bfloat16:
    raise ConfigError(f"model.attention_impl='cudnn' needs bfloat16 compute, but {key} is "
                      f"{jnp.dtype(dtype).name}")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """How a backbone's tokens sit on the image: `prefix_tokens` (cls, ...) first, then a
  rows x cols raster of patches of `patch_size` pixels (what the analyses need)."""
  prefix_tokens: int
  grid: tuple[int, int]
  patch_size: int

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


class Backbone(abc.ABC):
  """What a backbone tells the rest of mim_jax (see the module docstring)."""

  name: str

  @abc.abstractmethod
  def shape(self, model_config: Any) -> dict[str, int]:
    """{'width', 'depth', 'num_heads', ...} the config describes."""

  @abc.abstractmethod
  def validate(self, model_config: Any, image_size: int) -> None:
    """ConfigErrors for a `config.model` this backbone cannot build."""

  @abc.abstractmethod
  def build(self, model_config: Any, **role: Any) -> nn.Module:
    """The module for `config.model` and what the task needs of it."""

  @abc.abstractmethod
  def arch(self, model_config: Any, image_size: int, **role: Any) -> dict[str, Any]:
    """The architecture description (the JSON stored with converted weights)."""

  @abc.abstractmethod
  def build_from_arch(self, arch: dict[str, Any], **role: Any) -> nn.Module:
    """The module that a converted file's / checkpoint's architecture describes."""

  @abc.abstractmethod
  def num_layers(self, arch: dict[str, Any]) -> int:
    """Number of layers for layer-wise lr decay and the analysis (blocks, for a ViT)."""

  @abc.abstractmethod
  def layer_id(self, path: str, num_layers: int) -> int:
    """0 for the embedding, 1..num_layers for the layers, num_layers + 1 for the head."""

  @abc.abstractmethod
  def forward_flops(self, arch: dict[str, Any], num_patches: int) -> float:
    """Matmul FLOPs of one forward pass on `num_patches` patches."""

  @abc.abstractmethod
  def token_layout(self, arch: dict[str, Any], image_size: int) -> TokenLayout:
    """Where the encoder's output tokens sit on an `image_size` image."""


_BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  _BACKBONES[backbone.name] = backbone
  return backbone


def names() -> tuple[str, ...]:
  _load_all()
  return tuple(sorted(_BACKBONES))


def get(name: str) -> Backbone:
  """The backbone registered under `name`."""
  _load_all()
  if name not in _BACKBONES:
    raise ConfigError(f"model.name={name!r} is not a backbone; choose from {names()}")
  return _BACKBONES[name]


def get_backbone(model_config: Any) -> Backbone:
  """The backbone `config.model.name` names ('vit' when the config predates the key)."""
  return get(model_config.get("name", "vit") if hasattr(model_config, "get") else "vit")


def build_encoder(model_config: ml_collections.ConfigDict, **role: Any) -> nn.Module:
  """`config.model`'s backbone built for `role`."""
  return get_backbone(model_config).build(model_config, **role)


def _load_all() -> None:
  """Imports the modules that register backbones (one line per backbone)."""
  # pylint: disable=import-outside-toplevel,unused-import
  from mim_jax.models import vit_backbone  # noqa: F401
