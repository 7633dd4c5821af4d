r"""SimMIM pre-training of ViT-Tiny (12 heads) on ImageNet-1K, SimMIM's original ViT settings.

docs/methods.md, SimMIM. Following microsoft/SimMIM's ViT-B pre-training config
(`simmim_pretrain__vit_base__img224__800ep.yaml`) at ViT-Tiny width, for 400 epochs
as the MAE-Lite study does:
  * model: no absolute position embedding, one relative position bias shared by all
    blocks, layer scale 0.1, q and v biases (no k bias), SimMIM's truncated-normal
    init, stochastic depth 0.1, mask token in the encoder input;
  * masking: random 32x32-pixel mask patches, ratio 0.6 (30 of 49 at 224 px);
  * head: one linear map per token + PixelShuffle; L1 on the masked pixels of the
    normalised image;
  * data: RandomResizedCrop(224, scale (0.67, 1)), flip;
  * optimizer: AdamW (0.9, 0.999), eps 1e-8, weight decay 0.05 (not on 1-D params,
    pos_embed, cls_token), gradient norm clipped at 5; lr 1e-4 per 512 images
    (4e-4 at batch 2048), linear warm-up from 5e-7 per 512 (2e-6) over 10 epochs, then
    multistep x0.1 at epoch 700 (SimMIM's 800-epoch schedule; MAE-Lite keeps the
    milestone for its shorter runs, so 400 epochs run at the peak lr).

ImageNet (TFDS array_record, prepared once):
  python -m mim_jax.train --config configs/simmim_vit_tiny.py --workdir gs://BUCKET/simmim_tiny \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Laptop demo on the embedded photographs (64 px, patch 8, 16-px mask patches, 200 steps):
  python -m mim_jax.train --config configs/simmim_vit_tiny.py:demo --workdir /tmp/simmim_demo
"""

import ml_collections

from mim_jax import config_defaults
from mim_jax.tasks import simmim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_defaults.pretrain_config("simmim")
  config.simmim = simmim.default_config()
  config.mask_ratio = 0.6
  config.batch_size = 2048
  config.total_epochs = 400.0
  config.warmup_epochs = 10.0
  config.model.update(qkv_bias="qv", rel_pos_bias="shared", layer_scale=0.1,
                      abs_pos_embed=False, weight_init="simmim", drop_path_rate=0.1)
  config.data.crop_scale = (0.67, 1.0)
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",
      schedule="warmup_multistep",
      base_lr=0.5e-4,  # per 256 images: SimMIM's 1e-4 per 512
      warmup_start_lr=2e-6,  # SimMIM's 5e-7 per 512 images, at batch 2048
      milestone_epochs=(700.0,),
      decay_rate=0.1,
      b1=0.9,
      b2=0.999,
      weight_decay=0.05,
      clip_grad_norm=5.0,
  ))
  if arg == "demo":
    config_defaults.demo_overrides(config)
    config.data.crop_scale = (0.67, 1.0)
    config.simmim.mask_patch_size = 16  # a 4x4 grid of mask patches at 64 px
    config.optimizer.base_lr = 1.2e-3
    config.optimizer.warmup_start_lr = 0.0
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return config
