"""RegNet-X / RegNet-Y classifiers in timm's layout, for inference (a frozen teacher).

DeiT distils its students from timm's `regnety_160` (DeiT's own ImageNet
weights, `regnety_160.deit_in1k`), and MAE-Lite's `finetuning_distill_exp.py`
uses the same teacher. This module computes exactly what timm 1.0.31's
`timm.models.regnet.RegNet` computes in eval mode, so that a converted
state_dict (`mim_jax.convert.regnet_torch`) gives the same logits:

  stem: 3x3 conv, stride 2, `stem_width` channels, BatchNorm, ReLU;
  4 stages s1..s4 of SE bottleneck blocks b1..bn, the first of each with stride
    2 and a 1x1-conv + BatchNorm shortcut (timm's `downsample='conv1x1'`):
    1x1 conv -> BN -> ReLU -> 3x3 group conv (stride) -> BN -> ReLU
    -> SE (RegNet-Y: squeeze to round(se_ratio * block *input* width))
    -> 1x1 conv -> BN, + shortcut, ReLU (timm's `linear_out=False`);
  global average pool and a linear head (`head/fc`).

Stage widths and depths come from the RegNet parameters (w0, wa, wm, depth,
group size) by the paper's quantised linear rule, evaluated in float32 as timm
does (`stage_specs`). Convolutions have no bias and pad symmetrically by
((stride - 1) + (kernel - 1)) // 2 (timm's default padding; XLA's 'SAME'
pads a stride-2 convolution asymmetrically and would shift every feature).

BatchNorm always uses its running statistics (the `batch_stats` collection):
the teacher is frozen. Parameters are float32; `dtype` is the compute dtype
of the convolutions (float32, or bfloat16 on TPU/GPU); BatchNorm, the SE
squeeze, the pooling and the head compute in float32, and the logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.errors import UserError

PARAM_DTYPE = jnp.float32
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default, which timm keeps
WIDTH_QUANTUM = 8  # generate_regnet's `quant`: stage widths are multiples of 8
STAGE_STRIDE = 2   # every stage halves the resolution (timm's output_stride=32)


@dataclasses.dataclass(frozen=True)
class RegNetConfig:
  """The RegNet design-space parameters (timm's `RegNetCfg`, the X / Y subset).

  w0, wa, wm, depth: initial width, width slope, width multiplier and number of
    blocks of the paper's linear rule u_j = w0 + wa * j, quantised to powers of wm.
  group_size: channels per group of the 3x3 convolutions (before adjustment).
  se_ratio: squeeze width of the SE module / block input width (0 = RegNet-X).
  bottle_ratio: bottleneck width / block width (1 for every RegNet-X / Y).
  group_min_ratio: torchvision's rounding of bottleneck widths to the group size
    (timm's `*_tv` variants); 0 = pycls's nearest multiple.
  stem_width: channels of the stem convolution.
  """
  w0: int
  wa: float
  wm: float
  depth: int
  group_size: int
  se_ratio: float = 0.0
  bottle_ratio: float = 1.0
  group_min_ratio: float = 0.0
  stem_width: int = 32


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: its output width, number of blocks and group size (stride always 2)."""
  width: int
  depth: int
  group_size: int
  bottle_ratio: float


# timm's model_cfgs for the RegNet-X and RegNet-Y families (the paper's parameters).
CONFIGS: dict[str, RegNetConfig] = {
    "regnetx_002": RegNetConfig(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13),
    "regnetx_004": RegNetConfig(w0=24, wa=24.48, wm=2.54, group_size=16, depth=22),
    "regnetx_004_tv": RegNetConfig(w0=24, wa=24.48, wm=2.54, group_size=16, depth=22,
                                   group_min_ratio=0.9),
    "regnetx_006": RegNetConfig(w0=48, wa=36.97, wm=2.24, group_size=24, depth=16),
    "regnetx_008": RegNetConfig(w0=56, wa=35.73, wm=2.28, group_size=16, depth=16),
    "regnetx_016": RegNetConfig(w0=80, wa=34.01, wm=2.25, group_size=24, depth=18),
    "regnetx_032": RegNetConfig(w0=88, wa=26.31, wm=2.25, group_size=48, depth=25),
    "regnetx_040": RegNetConfig(w0=96, wa=38.65, wm=2.43, group_size=40, depth=23),
    "regnetx_064": RegNetConfig(w0=184, wa=60.83, wm=2.07, group_size=56, depth=17),
    "regnetx_080": RegNetConfig(w0=80, wa=49.56, wm=2.88, group_size=120, depth=23),
    "regnetx_120": RegNetConfig(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19),
    "regnetx_160": RegNetConfig(w0=216, wa=55.59, wm=2.1, group_size=128, depth=22),
    "regnetx_320": RegNetConfig(w0=320, wa=69.86, wm=2.0, group_size=168, depth=23),
    "regnety_002": RegNetConfig(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13, se_ratio=0.25),
    "regnety_004": RegNetConfig(w0=48, wa=27.89, wm=2.09, group_size=8, depth=16, se_ratio=0.25),
    "regnety_006": RegNetConfig(w0=48, wa=32.54, wm=2.32, group_size=16, depth=15,
                                se_ratio=0.25),
    "regnety_008": RegNetConfig(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14, se_ratio=0.25),
    "regnety_008_tv": RegNetConfig(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14,
                                   se_ratio=0.25, group_min_ratio=0.9),
    "regnety_016": RegNetConfig(w0=48, wa=20.71, wm=2.65, group_size=24, depth=27,
                                se_ratio=0.25),
    "regnety_032": RegNetConfig(w0=80, wa=42.63, wm=2.66, group_size=24, depth=21,
                                se_ratio=0.25),
    "regnety_040": RegNetConfig(w0=96, wa=31.41, wm=2.24, group_size=64, depth=22,
                                se_ratio=0.25),
    "regnety_064": RegNetConfig(w0=112, wa=33.22, wm=2.27, group_size=72, depth=25,
                                se_ratio=0.25),
    "regnety_080": RegNetConfig(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17,
                                se_ratio=0.25),
    "regnety_080_tv": RegNetConfig(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17,
                                   se_ratio=0.25, group_min_ratio=0.9),
    "regnety_120": RegNetConfig(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19,
                                se_ratio=0.25),
    "regnety_160": RegNetConfig(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18,
                                se_ratio=0.25),
    "regnety_320": RegNetConfig(w0=232, wa=115.89, wm=2.53, group_size=232, depth=20,
                                se_ratio=0.25),
    "regnety_640": RegNetConfig(w0=352, wa=147.48, wm=2.4, group_size=328, depth=20,
                                se_ratio=0.25),
    "regnety_1280": RegNetConfig(w0=456, wa=160.83, wm=2.52, group_size=264, depth=27,
                                 se_ratio=0.25),
    "regnety_2560": RegNetConfig(w0=640, wa=230.83, wm=2.53, group_size=373, depth=27,
                                 se_ratio=0.25),
}


def get_config(arch: str | RegNetConfig) -> RegNetConfig:
  """A named architecture (`CONFIGS`, timm's model name) or a config, as a config."""
  if isinstance(arch, RegNetConfig):
    return arch
  if arch not in CONFIGS:
    raise UserError(f"unknown RegNet architecture {arch!r}; choose from {', '.join(CONFIGS)} "
                    f"or pass a RegNetConfig")
  return CONFIGS[arch]


def _make_divisible(value: float, divisor: int, min_value: float) -> int:
  """timm's `make_divisible` (round to a multiple, at most 10% down), as timm calls it."""
  rounded = max(min_value or divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def stage_specs(config: RegNetConfig) -> tuple[StageSpec, ...]:
  """The four stages of a config: timm's `generate_regnet` + `adjust_widths_groups_comp`.

  The per-block widths are computed in float32, as timm computes them with torch
  tensors, so that a width on a rounding boundary rounds the same way.
  """
  if not (config.wa >= 0 and config.w0 > 0 and config.wm > 1 and
          config.w0 % WIDTH_QUANTUM == 0):
    raise UserError(f"invalid RegNet config {config}: needs wa >= 0, wm > 1 and w0 > 0 a "
                    f"multiple of {WIDTH_QUANTUM}")
  f32 = np.float32
  continuous = np.arange(config.depth, dtype=f32) * f32(config.wa) + f32(config.w0)
  exponents = np.round(np.log(continuous / f32(config.w0)) / f32(math.log(config.wm)))
  block_widths = np.round(f32(config.w0) * np.power(f32(config.wm), exponents) /
                          f32(WIDTH_QUANTUM)) * f32(WIDTH_QUANTUM)
  widths, depths = np.unique(block_widths.astype(np.int64), return_counts=True)
  if len(widths) != 4:
    raise UserError(f"RegNet config {config} gives {len(widths)} stages ({widths.tolist()}); "
                    f"timm's RegNet needs 4")
  specs = []
  for width, depth in zip(widths.tolist(), depths.tolist()):
    bottleneck = int(width * config.bottle_ratio)
    group = min(config.group_size, bottleneck)
    if config.group_min_ratio:
      bottleneck = _make_divisible(bottleneck, group, config.group_min_ratio)
    else:
      bottleneck = int(round(bottleneck / group) * group)
    specs.append(StageSpec(width=int(bottleneck / config.bottle_ratio), depth=depth,
                           group_size=group, bottle_ratio=config.bottle_ratio))
  return tuple(specs)


def same_padding(kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """timm's symmetric padding ((stride - 1) + (kernel - 1)) // 2 on both sides."""
  pad = ((stride - 1) + (kernel - 1)) // 2
  return ((pad, pad), (pad, pad))


conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # timm's He init


class ConvBN(nn.Module):
  """timm's `ConvNormAct`: bias-free convolution, BatchNorm (running stats), optional ReLU.

  Children `conv` and `bn` mirror timm's `*.conv.weight`, `*.bn.{weight,bias,
  running_mean,running_var}`.
  """
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding=same_padding(self.kernel, self.stride), feature_group_count=self.groups,
                use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                param_dtype=PARAM_DTYPE, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype,
                     param_dtype=PARAM_DTYPE, name="bn")(x)
    return nn.relu(x) if self.relu else x


class SqueezeExcite(nn.Module):
  """timm's `SEModule`: x * sigmoid(fc2(relu(fc1(mean over H, W)))), 1x1 convs with bias."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    squeezed = x.astype(jnp.float32).mean(axis=(1, 2), keepdims=True)
    squeezed = nn.Conv(self.reduced, (1, 1), dtype=jnp.float32, param_dtype=PARAM_DTYPE,
                       name="fc1")(squeezed)
    squeezed = nn.Conv(channels, (1, 1), dtype=jnp.float32, param_dtype=PARAM_DTYPE,
                       name="fc2")(nn.relu(squeezed))
    return x * jax.nn.sigmoid(squeezed).astype(x.dtype)


class Bottleneck(nn.Module):
  """timm's RegNet `Bottleneck` (SE after the group conv; post-activation ReLU)."""
  width: int
  stride: int
  group_size: int
  bottle_ratio: float = 1.0
  se_ratio: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_width = x.shape[-1]
    bottleneck = int(round(self.width * self.bottle_ratio))
    shortcut = x
    x = ConvBN(bottleneck, dtype=self.dtype, name="conv1")(x)
    x = ConvBN(bottleneck, kernel=3, stride=self.stride, groups=bottleneck // self.group_size,
               dtype=self.dtype, name="conv2")(x)
    if self.se_ratio:
      x = SqueezeExcite(int(round(in_width * self.se_ratio)), self.dtype, name="se")(x)
    x = ConvBN(self.width, relu=False, dtype=self.dtype, name="conv3")(x)
    if in_width != self.width or self.stride != 1:
      shortcut = ConvBN(self.width, stride=self.stride, relu=False, dtype=self.dtype,
                        name="downsample")(shortcut)
    return nn.relu(x + shortcut)


class RegStage(nn.Module):
  """One stage: blocks b1..b{depth}, the first with stride 2 and the conv shortcut."""
  spec: StageSpec
  se_ratio: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.spec.depth):
      x = Bottleneck(self.spec.width, STAGE_STRIDE if j == 0 else 1, self.spec.group_size,
                     self.spec.bottle_ratio, self.se_ratio, self.dtype, name=f"b{j + 1}")(x)
    return x


class ClassifierHead(nn.Module):
  """timm's `ClassifierHead` (average pool, linear `fc`), in float32."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = x.astype(jnp.float32).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=PARAM_DTYPE,
                    name="fc")(pooled)


class RegNet(nn.Module):
  """A RegNet-X / -Y classifier: normalised NHWC float32 images -> float32 logits.

  Variables: `params` and `batch_stats` (BatchNorm running mean / var), both
  imported from timm by `mim_jax.convert.regnet_torch`. Params are named as
  timm's modules: `stem/conv`, `s{i}/b{j}/conv1..3`, `s{i}/b{j}/se/fc1|fc2`,
  `s{i}/b1/downsample`, `head/fc`.

  Attributes:
    config: the architecture (`get_config('regnety_160')`).
    num_classes: classes of the linear head.
    dtype: compute dtype of the convolutions (see the module docstring).
  """
  config: RegNetConfig
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    x = ConvBN(self.config.stem_width, kernel=3, stride=STAGE_STRIDE, dtype=self.dtype,
               name="stem")(images.astype(self.dtype))
    for i, spec in enumerate(stage_specs(self.config)):
      x = RegStage(spec, self.config.se_ratio, self.dtype, name=f"s{i + 1}")(x)
    return ClassifierHead(self.num_classes, name="head")(x)


def regnet(arch: str | RegNetConfig, *, num_classes: int = 1000,
           dtype: Any = jnp.float32) -> RegNet:
  """`RegNet` for a named architecture ('regnety_160', DeiT's teacher) or a config."""
  return RegNet(get_config(arch), num_classes=num_classes, dtype=dtype)
