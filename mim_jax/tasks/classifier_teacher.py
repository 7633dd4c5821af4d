"""The frozen classifier a distillation-head fine-tuning learns from (DeiT, MAE-Lite).

DeiT and MAE-Lite's `finetuning_distill_exp.py` distil from timm's `regnety_160`
(DeiT's ImageNet weights, timm tag `regnety_160.deit_in1k`); any classifier with
the student's classes will do. A teacher is either

* a ViT classifier: a converted `.npz` of a fine-tuned model (`python -m
  mim_jax.convert from_torch`) or a mim_jax fine-tuning workdir, built from its own
  architecture description (`distill.teacher_arch=''`); or
* a timm RegNet (`distill.teacher_arch='regnety_160'`, any name of
  `models.regnet.CONFIGS`): its timm state_dict (`.safetensors`, or a `.pth` read
  weights-only; DeiT's `regnety_160-a5fe301d.pth` keeps it under 'model'),
  imported strictly by `convert.regnet_torch`. Reading it needs the `torch` extra.

Its variables ({'params'} or {'params', 'batch_stats'}) are a frozen input of the
jitted step: never trained, never checkpointed; their path and content hash are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops
from mim_jax.convert import converted, regnet_torch, torch_io
from mim_jax.errors import ConfigError
from mim_jax.models import registry, regnet, scan
from mim_jax.tasks import distill


@dataclasses.dataclass(frozen=True)
class ClassifierTeacher:
  """A frozen classifier: its module, what it is, and its variables once loaded."""
  module: nn.Module
  kind: str  # 'vit' | 'regnet'
  source: converted.Converted | None = None  # a ViT teacher's weights
  arch_name: str = ""  # a RegNet teacher's timm name

  def logits(self, variables: Any, images: jax.Array) -> jax.Array:
    """(B, classes) float32 logits of normalised images, without gradient."""
    if self.kind == "vit":
      out = self.module.apply({"params": scan.apply_layout(variables["params"], self.module)},
                              images)["logits"]
    else:
      out = self.module.apply(variables, images)
    return jax.lax.stop_gradient(out.astype(jnp.float32))

  def forward_flops(self, image_size: int) -> float:
    """Matmul / convolution FLOPs of one forward pass."""
    if self.kind == "vit":
      module = self.module
      patches = (image_size // module.patch_size)**2
      return (flops.vit_encoder_flops(patches, module.patch_size, module.width, module.depth,
                                      module.mlp_ratio) + 2 * module.width * module.num_classes)
    return regnet_forward_flops(self.module.config, image_size, self.module.num_classes)


def teacher_dtype(config: ml_collections.ConfigDict) -> Any:
  """distill.teacher_dtype, or model.dtype when unset."""
  name = config.distill.get("teacher_dtype") or config.model.dtype
  return registry.compute_dtype(name, "distill.teacher_dtype (or model.dtype)")


def build_teacher(config: ml_collections.ConfigDict, *,
                  random_teacher: bool = False) -> ClassifierTeacher:
  """The teacher `config.distill` names, its weights read and checked (not yet placed).

  Raises:
    ConfigError / UserError: no teacher given, an unreadable file, weights of another
      architecture, a teacher without a head or with another number of classes.
  """
  path, arch_name = config.distill.teacher, config.distill.teacher_arch
  dtype = teacher_dtype(config)
  if arch_name:
    module = regnet.regnet(arch_name, num_classes=config.num_classes, dtype=dtype)
    if not path and not random_teacher:
      raise ConfigError(f"distill.teacher is required: timm's {arch_name} state_dict "
                        f"(.safetensors or .pth; DeiT's teacher is regnety_160.deit_in1k)")
    return ClassifierTeacher(module, "regnet", arch_name=arch_name)
  if not path:
    raise ConfigError("distill.teacher is required: a fine-tuned ViT classifier (converted "
                      ".npz or mim_jax fine-tuning workdir), or set distill.teacher_arch="
                      "'regnety_160' and give timm's state_dict")
  source = converted.load_converted(path)
  arch = source.arch
  if not arch["num_classes"]:
    raise ConfigError(f"distill.teacher={path!r} has no classification head (a pre-trained "
                      f"encoder?); give a fine-tuned classifier")
  if arch["num_classes"] != config.num_classes:
    raise ConfigError(f"distill.teacher={path!r} has {arch['num_classes']} classes but "
                      f"num_classes={config.num_classes}")
  module = converted.build_encoder(arch, dtype=dtype)
  distill.check_teacher_params(module, distill.teacher_encoder_params(source),
                               config.image_size, repr(path))
  return ClassifierTeacher(module, "vit", source=source)


def load_teacher_variables(teacher: ClassifierTeacher, config: ml_collections.ConfigDict,
                           *, random_teacher: bool = False
                           ) -> tuple[dict[str, Any], dict[str, str]]:
  """(variables, {'path', 'sha256'}) of a built teacher: its frozen input and identity."""
  if teacher.kind == "vit":
    return ({"params": distill.teacher_encoder_params(teacher.source)},
            {"path": teacher.source.path, "sha256": teacher.source.sha256})
  if random_teacher and not config.distill.teacher:
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = teacher.module.init(jax.random.PRNGKey(config.seed), images)
    return jax.device_get(variables), {"path": "random", "sha256": "random"}
  path = config.distill.teacher
  state_dict = torch_io.read_torch_checkpoint(path)
  variables = regnet_torch.params_from_timm_state_dict(
      state_dict, teacher.arch_name, num_classes=config.num_classes, source=str(path))
  return variables, {"path": str(path), "sha256": converted.content_hash(variables)}


def _conv_out(size: int, kernel: int, stride: int) -> int:
  """Output side of a timm-padded convolution (`regnet.same_padding`)."""
  pad = ((stride - 1) + (kernel - 1)) // 2
  return (size + 2 * pad - kernel) // stride + 1


def regnet_forward_flops(config: regnet.RegNetConfig, image_size: int, num_classes: int) -> float:
  """2 x multiply-adds of every convolution and linear map of `regnet.RegNet`."""
  size = _conv_out(image_size, 3, regnet.STAGE_STRIDE)
  total = 2 * size * size * 9 * 3 * config.stem_width
  width = config.stem_width
  for spec in regnet.stage_specs(config):
    for j in range(spec.depth):
      stride = regnet.STAGE_STRIDE if j == 0 else 1
      out = _conv_out(size, 3, stride)
      bottleneck = int(round(spec.width * spec.bottle_ratio))
      total += 2 * size * size * width * bottleneck  # conv1, 1x1
      total += 2 * out * out * 9 * spec.group_size * bottleneck  # conv2, 3x3 grouped
      if config.se_ratio:
        total += 2 * 2 * bottleneck * int(round(width * config.se_ratio))
      total += 2 * out * out * bottleneck * spec.width  # conv3, 1x1
      if width != spec.width or stride != 1:
        total += 2 * out * out * width * spec.width  # downsample, 1x1
      size, width = out, spec.width
  return float(total + 2 * width * num_classes)

