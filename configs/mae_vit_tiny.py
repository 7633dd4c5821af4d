r"""MAE pre-training of ViT-Tiny (12 heads) on ImageNet-1K: the MAE-Lite recipe.

docs/methods.md §2: AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x 4096/256, 40 warm-up
epochs then cosine, 400 epochs, RandomResizedCrop(224, (0.08, 1)), flip, mask
ratio 0.75, norm-pix loss, decoder 1 block x 96 wide x 3 heads. The reference
takes 23 h on 8 V100s; fine-tuned 300 epochs it reaches 78.0% top-1.

ImageNet (TFDS array_record, prepared once):
  python -m mim_jax.train --config configs/mae_vit_tiny.py --workdir gs://BUCKET/mae_tiny \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Laptop demo on the embedded photographs (64 px, patch 8, 200 steps, a few
minutes on 2 CPU cores; the loss falls from ~1.0 to ~0.6):
  python -m mim_jax.train --config configs/mae_vit_tiny.py:demo --workdir /tmp/mae_demo
"""

from mim_jax import config_defaults


def get_config(arg: str | None = None):
  return config_defaults.recipe(arg)
