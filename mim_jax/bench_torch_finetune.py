"""The benchmarked fine-tuning step in PyTorch (timm's ViT, Mixup and loss), for timing.

The counterpart of `bench_torch.py` for `task='finetune'`, used by the suite
(`python -m mim_jax.bench --suite`): MAE's `main_finetune.py` step written with
timm: `VisionTransformer` with global average pooling + `fc_norm` (or the cls
token), stochastic depth, `timm.data.Mixup` (mixup / cutmix, label smoothing),
`SoftTargetCrossEntropy`, `torch.optim.AdamW`. Layer-wise lr decay is a choice
of per-parameter lr that costs nothing and is left out. A timing twin, not a
numerical reference.
"""

import time
from typing import Any

import ml_collections
import numpy as np

from mim_jax.bench_torch import _torch
from mim_jax.models.vit_backbone import shape_of


def build_step(config: ml_collections.ConfigDict, device: str = "cpu"):
  """(step(images NCHW float, labels int64) -> loss, number of trained parameters)."""
  torch = _torch()
  from timm.data import Mixup  # pylint: disable=g-import-not-at-top
  from timm.loss import SoftTargetCrossEntropy  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top

  model_cfg = config.model
  enc = shape_of(model_cfg.variant or None, width=model_cfg.width, depth=model_cfg.depth,
                 num_heads=model_cfg.num_heads)
  model = vision_transformer.VisionTransformer(
      img_size=config.image_size, patch_size=model_cfg.patch_size, embed_dim=enc["width"],
      depth=enc["depth"], num_heads=enc["num_heads"], mlp_ratio=model_cfg.mlp_ratio,
      num_classes=config.num_classes, global_pool="avg" if model_cfg.pool == "gap" else "token",
      drop_path_rate=model_cfg.drop_path_rate, qkv_bias=True).to(device)
  mix = config.mixup
  mixup = None
  if mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0):
    mixup = Mixup(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                  switch_prob=mix.switch_prob, label_smoothing=mix.label_smoothing,
                  num_classes=config.num_classes)
  loss_fn = SoftTargetCrossEntropy()
  opt = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(opt.b1, opt.b2),
                                weight_decay=opt.weight_decay)

  def step(images, labels):
    if mixup is not None:
      images, targets = mixup(images, labels)
    else:
      targets = torch.nn.functional.one_hot(labels, config.num_classes).float()
    loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench(config: ml_collections.ConfigDict, steps: int, device: str = "cpu") -> dict[str, Any]:
  """Median step time on `device` ('cpu' or 'cuda'); bfloat16 autocast when model.dtype is."""
  torch = _torch()
  if config.task != "finetune":
    raise ValueError(f"this twin times fine-tuning steps, not task={config.task!r}")
  if device == "cuda" and not torch.cuda.is_available():
    raise ValueError("device='cuda' but torch sees no CUDA device")
  torch.manual_seed(0)
  step, num_params = build_step(config, device)
  rng = np.random.RandomState(0)
  images = torch.from_numpy(rng.standard_normal(
      (config.batch_size, 3, config.image_size, config.image_size)).astype(np.float32))
  labels = torch.from_numpy(rng.randint(0, config.num_classes, config.batch_size))
  images, labels = images.to(device), labels.to(device)
  bf16 = config.model.dtype == "bfloat16"

  def timed_step() -> float:
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      step(images, labels)
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  first_s = timed_step()
  step_s = float(np.median([timed_step() for _ in range(steps)]))
  return {"torch": torch.__version__, "device": device, "autocast": "bfloat16" if bf16 else "off",
          "threads": torch.get_num_threads(), "trained_params": num_params,
          "first_step_s": first_s, "step_ms": 1e3 * step_s,
          "images_per_sec": config.batch_size / step_s}
