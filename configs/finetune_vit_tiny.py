r"""Fine-tuning ViT-Tiny (12 heads) on ImageNet-1K: the MAE-Lite recipe (paper Table S1).

docs/methods.md §7: AdamW (0.9, 0.999), lr 1e-3 x 1024/256, weight decay 0.05 (none on
1-D params and tokens), batch 1024, 5 warm-up epochs then cosine to 1e-6, 300
epochs, RandAugment(m=10, mstd=0.5), mixup 0.2, cutmix 0, label smoothing 0,
drop path 0, global average pooling + LayerNorm, layer-wise lr decay 0.85,
bicubic resize. From D²-MAE pre-training the reference reaches 78.7% top-1
(MAE: 78.0%, from scratch with this recipe: ~75.8%).

  python -m mim_jax.train --config configs/finetune_vit_tiny.py --workdir gs://BUCKET/ft_tiny \
      --config.init=gs://BUCKET/d2mae_tiny --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`--config.init` takes a mim_jax pre-training workdir or a converted PyTorch
checkpoint (`python -m mim_jax.convert from_torch ...`); leave it empty to train
from scratch. `--config.init_keep_blocks=k` keeps only the first k pre-trained
blocks (the paper's layer-reservation experiment, §4.2).

Laptop demo on scikit-learn's digits (10 classes, upsampled to 32 px, patch 8):
  python -m mim_jax.train --config configs/finetune_vit_tiny.py:demo --workdir /tmp/ft_demo
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  config = config_defaults.finetune_config()
  if arg == "demo":
    config = config_defaults.finetune_demo_overrides(config)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return config
