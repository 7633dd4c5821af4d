"""Defaults shared by the files in configs/: each recipe starts from `base_config()`."""

from typing import Any

import ml_collections
from ml_collections import config_dict

from mim_jax.data.sources import default_data_config


def vit_model_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.model` of a ViT backbone (models/vit_backbone.py), ViT-Tiny by default."""
  model = ml_collections.ConfigDict(dict(
      name="vit",  # the backbone (models/registry.py)
      variant="tiny",  # tiny | small | base | large; width/depth/num_heads override it
      patch_size=16,
      width=config_dict.placeholder(int),
      depth=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int),
      mlp_ratio=4.0,
      dtype="float32",  # compute dtype: float32 | bfloat16 (TPU/GPU); params stay float32
      remat="none",  # none | block | block_dots: recompute block activations in backward
      scan_blocks=False,  # nn.scan over the blocks (checkpoints keep blocks_{i} either way)
      # explicit | xla | cudnn: attention of blocks whose logits nobody reads (the
      # decoder, a teacher below its distilled layer, undistilled student blocks, every
      # block of a classifier); cudnn = cuDNN flash attention (GPU, bfloat16)
      attention_impl="explicit",
      drop_path_rate=0.0,  # stochastic depth of the last block (linear in depth)
      # Options of BEiT / SimMIM-style ViTs (MAE's ViT: qkv, none, None, True, mae):
      qkv_bias="qkv",  # qkv: one bias on the fused projection | qv: q and v only | none
      rel_pos_bias="none",  # none | shared (one table for all blocks) | per_block
      layer_scale=config_dict.placeholder(float),  # per-channel residual scale init; None = off
      abs_pos_embed=True,  # False: no absolute position embedding (SimMIM's ViT)
      weight_init="mae",  # mae | simmim (truncated normal, rescaled output projections)
  ))
  model.update(overrides)
  return model


def pretrain_config(task: str) -> ml_collections.ConfigDict:
  """The keys every masked-image-modeling pre-training shares, with MAE-Lite's ImageNet values.

  Each method adds its own sub-tree (`config.mae`, `config.distill`, `config.simmim`,
  ...) and sets its recipe; `mask_ratio` is every masking method's.
  """
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0

  # Length: set total_steps, or leave it unset and set total_epochs (the other is derived).
  config.batch_size = 4096  # global, over all processes and devices
  # >1: the batch's gradient as the mean over this many micro-batches, in one step
  # (trainer/accumulate.py): the paper's batch on one GPU; batch_size stays the global one
  config.grad_accum_steps = 1
  config.total_steps = config_dict.placeholder(int)
  config.total_epochs = 400.0
  config.warmup_steps = config_dict.placeholder(int)
  config.warmup_epochs = 40.0

  config.image_size = 224
  config.mask_ratio = 0.75
  config.model = vit_model_config()
  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,  # lr = base_lr * batch_size / 256
      end_lr=0.0,
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
  ))
  # dcn_data: slices the data axis spans on a multislice run (-1: all; the rest extend fsdp)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**14,
                                               dcn_data=-1))

  config.data = default_data_config()
  config.data.kind = "tfds"
  config.data.name = "imagenet2012"
  config.data.crop_scale = (0.08, 1.0)

  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.image_every = 5000  # reconstruction PNG every N steps (and at the end); 0 = never
  return config


def base_config() -> ml_collections.ConfigDict:
  """MAE ViT-Tiny's ImageNet-1K recipe (MAE-Lite): the shared keys plus `config.mae`."""
  from mim_jax.tasks import mae  # pylint: disable=g-import-not-at-top
  config = pretrain_config("mae")
  config.mae = mae.default_config()
  return config


def laptop_schedule(config: ml_collections.ConfigDict) -> None:
  """The demos' run length and cadence: 200 steps (20 warm-up), log every 20, save every 100."""
  config.total_epochs = 0.0
  config.total_steps = 200
  config.warmup_epochs = 0.0
  config.warmup_steps = 20
  config.log_every = 20
  config.checkpoint_every = 100
  config.keep_checkpoints = 2


def demo_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a recipe to the embedded demo dataset and a laptop-CPU size."""
  config.data.kind = "demo"
  config.data.name = "mim_jax_demo"
  config.data.crop_scale = (0.2, 1.0)
  config.image_size = 64
  config.model.patch_size = 8
  config.batch_size = 32
  laptop_schedule(config)
  config.optimizer.base_lr = 1.5e-4 * 8
  config.image_every = 100
  return config


def recipe(arg: str | None) -> ml_collections.ConfigDict:
  """`base_config()`, or with arg 'demo' its laptop-sized version (a config file's argument)."""
  if arg == "demo":
    return demo_overrides(base_config())
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return base_config()


def distillation_overrides(config: ml_collections.ConfigDict, *,
                           decoupled: bool) -> ml_collections.ConfigDict:
  """D-MAE or, with `decoupled`, D²-MAE on top of an MAE recipe (docs/methods.md).

  D-MAE: student layer 12's attention logits <-> teacher layer 12, alpha 1.
  D²-MAE: a 13th attention-only block distilled to teacher layer 12; the decoder
  reads block 8.
  """
  from mim_jax.tasks import distill  # pylint: disable=g-import-not-at-top
  depth = config.model.depth or 12
  config.task = "d2mae" if decoupled else "dmae"
  config.distill = distill.default_config()
  config.distill.extra_attention_block = decoupled
  config.mae.decoder_layer = 8 if decoupled else None
  config.distill.attn_pairs = ((depth + 1, 12),) if decoupled else ((depth, 12),)
  config.distill.attn_weight = 1.0
  if config.data.kind == "demo":
    config.distill.teacher_variant = ""  # a demo teacher is whatever mim_jax run you give
  return config


def finetune_config() -> ml_collections.ConfigDict:
  """Every key of a fine-tuning config, with the paper's ViT-Tiny ImageNet-1K recipe (Table S1)."""
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.seed = 0
  config.init = ""  # pre-trained weights: a mim_jax workdir or a converted .npz; "" = scratch
  config.init_keep_blocks = config_dict.placeholder(int)  # layer reservation: keep blocks 1..k

  config.batch_size = 1024
  config.grad_accum_steps = 1  # >1: gradient accumulation over micro-batches (see pretrain_config)
  config.total_steps = config_dict.placeholder(int)
  config.total_epochs = 300.0
  config.warmup_steps = config_dict.placeholder(int)
  config.warmup_epochs = 5.0
  config.image_size = 224
  config.num_classes = 1000

  config.model = vit_model_config(
      pool="gap",  # global average pooling of patch tokens + fc_norm; 'cls' = cls token
  )
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", base_lr=1e-3, end_lr=1e-6, b1=0.9, b2=0.999, weight_decay=0.05,
      momentum=0.9,  # sgd only
      layer_decay=0.85,  # lr scale decay ** (depth + 1 - layer id); None = off
  ))
  config.mixup = ml_collections.ConfigDict(dict(
      mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, label_smoothing=0.0))
  config.ema_decay = config_dict.placeholder(float)  # EMA of the weights, evaluated too
  # timm's RandomErasing (count 1) after normalisation, before mixup: the box drawn in the
  # workers (`data.random_erasing.EraseBox`), filled on the device. MAE's recipe: 0.25, pixel.
  config.random_erasing = ml_collections.ConfigDict(dict(
      prob=0.0,  # chance an image has a box erased; 0 = off (Table S1)
      mode="pixel",  # pixel: N(0, 1) per pixel | rand: one N(0, 1) colour | const: zeros
  ))

  # dcn_data: slices the data axis spans on a multislice run (-1: all; the rest extend fsdp)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**14,
                                               dcn_data=-1))
  config.data = default_data_config()
  config.data.kind = "tfds"
  config.data.name = "imagenet2012"
  config.data.crop_scale = (0.08, 1.0)
  config.data.randaug_magnitude = 10
  config.data.randaug_mstd = 0.5
  config.data.color_jitter = 0.3

  config.eval_every = 5000  # steps; evaluation also runs at the end
  config.eval_batch_size = 1024
  config.allow_no_eval = False
  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.image_every = 0
  return config


def digits_overrides(config: ml_collections.ConfigDict) -> None:
  """A classification recipe's data and model input on scikit-learn's digits (32 px, patch 8)."""
  config.data.kind = "digits"
  config.data.name = "mim_jax_digits"
  config.data.digits_size = 32
  config.data.eval_split = "validation"
  config.data.crop_scale = (0.5, 1.0)
  config.data.flip = False  # a mirrored digit is another symbol
  config.image_size = 32
  config.num_classes = 10
  config.model.patch_size = 8


def finetune_demo_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A fine-tuning recipe shrunk to scikit-learn's digits (shipped offline) on a laptop CPU."""
  digits_overrides(config)
  config.batch_size = 64
  config.eval_batch_size = 64
  laptop_schedule(config)
  config.optimizer.base_lr = 1.6e-2  # small data, 200 steps: a higher lr than ImageNet's
  config.data.randaug_magnitude = 5  # digits survive mild RandAugment only
  config.eval_every = 100
  return config


def rpe_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """MAE-Lite's `finetuning_rpe_exp.py` model on a fine-tuning recipe: `vit_tiny_patch16_rpe`
  with a relative position bias table in every block (started at 0: pre-trained encoders
  have none), q and v biases (no k bias; started at 0, as the official load drops the
  pre-trained fused qkv bias) and the absolute position embedding kept."""
  config.model.update(qkv_bias="qv", rel_pos_bias="per_block", abs_pos_embed=True)
  return config


def finetune_distillation_overrides(config: ml_collections.ConfigDict
                                    ) -> ml_collections.ConfigDict:
  """MAE-Lite's `finetuning_distill_exp.py` on a fine-tuning recipe: task 'finetune_distill'
  (DeiT-style head, hard distillation from RegNetY-160, alpha 0.5, tau 1) with the recipe
  of its base, `finetuning_mae_exp.py` (MAE's: RandAugment m9, mixup 0.8, cutmix 1.0,
  label smoothing 0.1, random erasing 0.25, drop path 0.1)."""
  from mim_jax.tasks import finetune_distill  # pylint: disable=g-import-not-at-top
  config.task = "finetune_distill"
  config.distill = finetune_distill.default_config()
  config.model.drop_path_rate = 0.1
  config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
  config.random_erasing.update(prob=0.25, mode="pixel")
  config.data.randaug_magnitude = 9
  config.data.color_jitter = 0.0  # the exp's 0.4 is dropped by timm under RandAugment
  return config


def linear_probe_config() -> ml_collections.ConfigDict:
  """Every key of a linear-probing config, with MAE's ViT recipe (`main_linprobe.py`).

  LARS (momentum 0.9, no weight decay), base lr 0.1 x 16384/256, 10 warm-up epochs
  then cosine, 90 epochs; RandomResizedCrop + flip; the cls token's features.
  """
  config = finetune_config()
  config.task = "linear_probe"
  # nothing to mix, erase, reserve or average
  for key in ("init_keep_blocks", "mixup", "random_erasing", "ema_decay"):
    del config[key]
  del config.model["drop_path_rate"]
  del config.model["remat"]  # the encoder is frozen: no backward pass to save memory in
  config.model.pool = "cls"  # MAE's probe default; 'gap' = mean of patch tokens, no affine
  config.batch_size = 16384
  config.total_epochs = 90.0
  config.warmup_epochs = 10.0
  config.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_lr=0.1, end_lr=0.0, weight_decay=0.0, momentum=0.9,
      trust_coefficient=0.001))
  config.data.randaug_magnitude = None
  config.data.color_jitter = 0.0
  config.eval_every = 2000
  return config


def linear_probe_demo_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The linear probe on scikit-learn's digits, as the fine-tuning demo."""
  digits_overrides(config)
  config.batch_size = 256
  config.eval_batch_size = 128
  laptop_schedule(config)
  config.total_steps = 100
  config.warmup_steps = 10
  config.checkpoint_every = 100
  config.eval_every = 100
  # LARS moves a matrix by about lr x 0.001 of its norm per step, made for ImageNet's
  # thousands of steps; in 100 steps SGD gets there, LARS does not.
  config.optimizer.name = "sgd"
  config.optimizer.base_lr = 0.4
  return config
