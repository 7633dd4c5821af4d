r"""Linear probing of a pre-trained ViT-Tiny on ImageNet-1K: MAE's protocol.

The encoder is frozen; a BatchNorm without affine + linear head is trained on
the cls token's features (`--config.model.pool=gap`: mean of the patch tokens).
LARS (momentum 0.9, trust coefficient 0.001, no weight decay), base lr 0.1,
lr = 0.1 x 16384/256, batch 16384, 10 warm-up epochs then cosine, 90 epochs,
RandomResizedCrop + flip, evaluation on resize + centre crop. The paper reports
no linear-probe numbers for ViT-Tiny: MAE-pre-trained tiny ViTs probe poorly
(that is the paper's point about lightweight MIM); use it to compare
pre-trainings, and fine-tuning (configs/finetune_vit_tiny.py) for the headline.

  python -m mim_jax.train --config configs/linear_probe_vit_tiny.py --workdir gs://BUCKET/lp \
      --config.init=gs://BUCKET/d2mae_tiny --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`--config.init` takes a mim_jax workdir or a converted PyTorch checkpoint; empty
probes a random encoder (a baseline). The checkpoints hold the head and the
BatchNorm statistics; the encoder is named by path and content hash.

Laptop demo on scikit-learn's digits (10 classes, 32 px, patch 8), ~1 min:
  python -m mim_jax.train --config configs/linear_probe_vit_tiny.py:demo --workdir /tmp/lp_demo \
      --config.init=/tmp/mim_jax_demo/d2mae_student
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  config = config_defaults.linear_probe_config()
  if arg == "demo":
    config = config_defaults.linear_probe_demo_overrides(config)
    config.model.update(variant="", width=96, depth=12, num_heads=6)  # the demo's students
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'demo' or nothing")
  return config
