r"""D-MAE: MAE pre-training of ViT-Tiny distilled from a frozen MAE ViT-Base (docs/methods.md §3).

The MAE-Lite recipe of configs/mae_vit_tiny.py plus attention distillation:
student layer 12's pre-softmax attention logits, through a learnable 12x12 head
mapping, regress the teacher's layer-12 logits on the same visible patches;
loss = L_rec + 1.0 * L_attn. 400 epochs at batch 4096; fine-tuned for 300
epochs the reference reaches 78.3% top-1 (code release: 78.4%).

The teacher is required: convert the official MAE checkpoint once, then train:
  python -m mim_jax.convert from_torch mae_pretrain_vit_base.pth /data/mae_vit_base.npz
  python -m mim_jax.train --config configs/dmae_vit_tiny.py --workdir gs://BUCKET/dmae_tiny \
      --config.distill.teacher=/data/mae_vit_base.npz \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Laptop demo (64 px, patch 8, 200 steps on the embedded photographs), with any
mim_jax pre-training run of the same patch size as the teacher:
  python -m mim_jax.train --config configs/mae_vit_tiny.py:demo --workdir /tmp/mae_demo
  python -m mim_jax.train --config configs/dmae_vit_tiny.py:demo --workdir /tmp/dmae_demo \
      --config.distill.teacher=/tmp/mae_demo
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  return config_defaults.distillation_overrides(config_defaults.recipe(arg), decoupled=False)
