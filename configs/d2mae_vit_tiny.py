r"""D²-MAE: decoupled distillation of ViT-Tiny from a frozen MAE ViT-Base (docs/methods.md §4).

The paper's best recipe. The student has 13 blocks during pre-training: the
reconstruction decoder reads the final norm of block 8; block 13 only computes
attention logits on block 12's output, and those (through a learnable 12x12
head mapping) regress the teacher's layer-12 logits on the same visible
patches, so blocks 9-12 learn from distillation alone. loss = L_rec + 1.0 *
L_attn. 400 epochs at batch 4096; fine-tuned for 300 epochs (blocks 1-12) the
reference reaches 78.7% top-1 (79.4% with 1000 epochs and relative position bias).

The teacher is required: convert the official MAE checkpoint once, then train:
  python -m mim_jax.convert from_torch mae_pretrain_vit_base.pth /data/mae_vit_base.npz
  python -m mim_jax.train --config configs/d2mae_vit_tiny.py --workdir gs://BUCKET/d2mae_tiny \
      --config.distill.teacher=/data/mae_vit_base.npz \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Laptop demo (64 px, patch 8, 200 steps on the embedded photographs), with any
mim_jax pre-training run of the same patch size as the teacher
(`python -m mim_jax.demo` runs this whole flow):
  python -m mim_jax.train --config configs/mae_vit_tiny.py:demo --workdir /tmp/mae_demo
  python -m mim_jax.train --config configs/d2mae_vit_tiny.py:demo --workdir /tmp/d2mae_demo \
      --config.distill.teacher=/tmp/mae_demo
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  return config_defaults.distillation_overrides(config_defaults.recipe(arg), decoupled=True)
