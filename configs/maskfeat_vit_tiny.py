r"""MaskFeat pre-training of ViT-Tiny (12 heads) on ImageNet-1K: HOG targets.

docs/methods.md, MaskFeat. SlowFast's image MaskFeat (`configs/masked_ssl/
in1k_VIT_B_MaskFeat_PT.yaml`, `MaskMViT`) at ViT-Tiny width, 400 epochs as the other
methods of the MAE-Lite study (the reference config runs 300, the paper 1600):
  * masking: BEiT's block-wise generator in the data workers, 40% of the 14x14 patches
    (78), blocks of at least 15 patches;
  * model: mask token in the encoder input, learned absolute position embedding,
    SlowFast's ViT init, no final norm; head = LayerNorm + linear to 108 HOG values
    per patch (2x2 cells of 8 px, 3 colour channels, 9 orientation bins, L2-normalised
    per cell and channel, no Gaussian window);
  * loss: mean squared error over the masked patches;
  * data: RandomResizedCrop(224, scale (0.5, 1), ratio (3/4, 4/3)), flip;
  * optimizer: AdamW (0.9, 0.999), weight decay 0.05 on every leaf of 2+ dims (pos_embed
    and cls_token included: ZERO_DECAY_POS_CLS is off), gradient norm clipped at 0.02;
    lr 2e-4 per 256 images, linear warm-up from 1e-6 over 30 epochs, cosine to 1e-6.

ImageNet (TFDS array_record, prepared once):
  python -m mim_jax.train --config configs/maskfeat_vit_tiny.py \
      --workdir gs://BUCKET/maskfeat_tiny \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Laptop demo on the embedded photographs (64 px, patch 8 = one HOG cell, 200 steps):
  python -m mim_jax.train --config configs/maskfeat_vit_tiny.py:demo --workdir /tmp/maskfeat_demo
"""

import ml_collections

from mim_jax import config_defaults
from mim_jax.tasks import maskfeat


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_defaults.pretrain_config("maskfeat")
  config.maskfeat = maskfeat.default_config()
  config.mask_ratio = 0.4
  config.batch_size = 2048
  config.total_epochs = 400.0
  config.warmup_epochs = 30.0
  config.model.weight_init = "maskfeat"
  config.data.crop_scale = (0.5, 1.0)
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",
      base_lr=2e-4,  # per 256 images
      warmup_start_lr=1e-6,
      end_lr=1e-6,
      b1=0.9,
      b2=0.999,
      weight_decay=0.05,
      clip_grad_norm=0.02,
  ))
  config.image_every = 0  # HOG targets: no reconstruction figure
  if arg == "demo":
    config_defaults.demo_overrides(config)
    config.data.crop_scale = (0.5, 1.0)
    config.image_every = 0
    config.optimizer.base_lr = 1.6e-3
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return config
