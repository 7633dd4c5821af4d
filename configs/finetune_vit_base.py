r"""Fine-tuning ViT-Base on ImageNet-1K: MAE's official recipe (MAE FINETUNE.md).

Batch 1024, AdamW (0.9, 0.999), base lr 5e-4 (lr = 5e-4 x 1024/256), weight decay
0.05, layer decay 0.65, drop path 0.1, 100 epochs with 5 warm-up, cosine to 1e-6,
RandAugment(m=9, mstd=0.5), mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing
0.25 (pixel mode, one box), global average pooling. From the official MAE ViT-B
checkpoint it reaches 83.6% top-1.

  python -m mim_jax.convert from_torch mae_pretrain_vit_base.pth /data/mae_vit_base.npz
  python -m mim_jax.train --config configs/finetune_vit_base.py --workdir gs://BUCKET/ft_base \
      --config.init=/data/mae_vit_base.npz --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  config = config_defaults.finetune_config()
  config.model.variant = "base"
  config.model.drop_path_rate = 0.1
  config.total_epochs = 100.0
  config.warmup_epochs = 5.0
  config.optimizer.update(base_lr=5e-4, layer_decay=0.65)
  config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
  config.data.randaug_magnitude = 9
  config.data.color_jitter = 0.0  # timm turns colour jitter off under RandAugment anyway
  config.random_erasing.update(prob=0.25, mode="pixel")
  if arg == "demo":
    config = config_defaults.finetune_demo_overrides(config)
    config.random_erasing.prob = 0.0  # a third of a 32-px digit erased leaves little to learn
    config.model.update(variant="", width=96, depth=4, num_heads=6)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return config
