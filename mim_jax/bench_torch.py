"""The benchmarked pre-training step in PyTorch (timm ViTs, the same losses), for timing.

`python -m mim_jax.bench --config ... --torch` times this next to the JAX step, on
the same machine in the same run. It is the step of the PyTorch reference
implementations (MAE, MAE-Lite) written with timm modules: patch embedding,
random masking by argsort of noise, timm `Block`s, the MAE decoder and norm-pix
loss; for D-MAE / D²-MAE a frozen timm teacher under `torch.no_grad` on the same
kept patches, pre-softmax attention logits, a learned head mapping and the MSE;
`torch.optim.AdamW`. It is a timing twin, not a numerical reference (tests check
numbers against separate float64 references).
"""

import time
from typing import Any

import ml_collections
import numpy as np

from mim_jax.models.vit import VARIANTS
from mim_jax.models.vit_backbone import shape_of


def _torch():
  try:
    import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f"--torch needs torch and timm: pip install -e '.[torch]' ({error})")
  return torch


def teacher_architecture(config: ml_collections.ConfigDict) -> dict[str, int]:
  """The teacher's width/depth/heads: its file's (random weights are timed), else the variant's."""
  if config.distill.teacher:
    from mim_jax.convert import converted  # pylint: disable=g-import-not-at-top
    arch = converted.load_converted(config.distill.teacher).arch
    return {k: arch[k] for k in ("width", "depth", "num_heads")}
  return VARIANTS[config.distill.teacher_variant or "base"]


def build_step(config: ml_collections.ConfigDict, device: str = "cpu"):
  """(step(images NCHW float) -> loss, number of trained parameters) for the config's task."""
  torch = _torch()
  from torch import nn  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import Block, VisionTransformer

  model_cfg = config.model
  enc = shape_of(model_cfg.variant or None, width=model_cfg.width, depth=model_cfg.depth,
                 num_heads=model_cfg.num_heads)
  patch, size = model_cfg.patch_size, config.image_size
  num_patches = (size // patch)**2
  keep = int(num_patches * (1 - config.mask_ratio))
  distilled = config.task in ("dmae", "d2mae")
  extra = distilled and bool(config.distill.extra_attention_block)
  decoder_layer = config.mae.decoder_layer or enc["depth"]

  def vit(width, depth, heads):
    model = VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=depth,
                              num_heads=heads, mlp_ratio=model_cfg.mlp_ratio, num_classes=0,
                              qkv_bias=True)
    model.pos_embed.requires_grad_(False)  # MAE's fixed sin-cos table (the values do not
    return model                            # change the timing)

  def logits_of(block, x):
    """Pre-softmax attention logits of a timm Block on x: (B, h, N, N)."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
    return (q @ k.transpose(-2, -1)) * attn.scale

  def embed(encoder, images, ids_keep):
    x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)

  class Student(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = vit(enc["width"], enc["depth"], enc["num_heads"])
      if extra:  # D²-MAE's block 13: LN1 + qkv only, as the reference keeps it
        self.extra = nn.Module()
        self.extra.norm1 = nn.LayerNorm(enc["width"], eps=1e-6)
        self.extra.attn = nn.Module()
        self.extra.attn.qkv = nn.Linear(enc["width"], 3 * enc["width"])
        self.extra.attn.num_heads = enc["num_heads"]
        self.extra.attn.scale = (enc["width"] // enc["num_heads"])**-0.5
      dec = config.mae.decoder
      self.decoder_embed = nn.Linear(enc["width"], dec.width)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.width))
      self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches + 1, dec.width),
                                      requires_grad=False)
      self.decoder_blocks = nn.ModuleList(
          [Block(dec.width, dec.num_heads, qkv_bias=True) for _ in range(dec.depth)])
      self.decoder_norm = nn.LayerNorm(dec.width, eps=1e-6)
      self.decoder_pred = nn.Linear(dec.width, patch * patch * 3)

    def forward(self, images, ids_keep, ids_restore, capture):
      x = embed(self.encoder, images, ids_keep)
      latent, logits = None, {}
      for i, block in enumerate(self.encoder.blocks):
        if i + 1 in capture:
          logits[i + 1] = logits_of(block, x)
        x = block(x)
        if i + 1 == decoder_layer:
          latent = self.encoder.norm(x)
      if extra:
        logits[enc["depth"] + 1] = logits_of(self.extra, x)
      y = self.decoder_embed(latent)
      masks = self.mask_token.expand(y.shape[0], num_patches + 1 - y.shape[1], -1)
      tokens = torch.cat([y[:, 1:], masks], dim=1)
      tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))
      y = torch.cat([y[:, :1], tokens], dim=1) + self.decoder_pos
      for block in self.decoder_blocks:
        y = block(y)
      return self.decoder_pred(self.decoder_norm(y))[:, 1:], logits

  student = Student().to(device)
  pairs = tuple(tuple(p) for p in config.distill.attn_pairs) if distilled else ()
  teacher = mappings = None
  if distilled:
    t = teacher_architecture(config)
    teacher = vit(t["width"], t["depth"], t["num_heads"]).to(device).eval()
    for p in teacher.parameters():
      p.requires_grad_(False)
    mappings = nn.ModuleList([nn.Linear(enc["num_heads"], t["num_heads"], bias=False)
                              for _ in pairs]).to(device)
  trained = [p for p in student.parameters() if p.requires_grad]
  trained += list(mappings.parameters()) if mappings else []
  optimizer = torch.optim.AdamW(trained, lr=1e-4,
                                betas=(config.optimizer.b1, config.optimizer.b2),
                                weight_decay=config.optimizer.weight_decay)

  def patchify(images):
    b = images.shape[0]
    g = size // patch
    x = images.reshape(b, 3, g, patch, g, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, g * g, patch * patch * 3)

  def step(images):
    batch = images.shape[0]
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    pred, logits = student(images, ids_keep, ids_restore, {s for s, _ in pairs})
    target = patchify(images)
    if config.mae.norm_pix_loss:
      mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
      target = (target - mean) / (var + 1e-6)**0.5
    loss = (((pred - target)**2).mean(-1) * mask).sum() / mask.sum()
    if distilled:
      with torch.no_grad():
        x = embed(teacher, images, ids_keep)
        teacher_logits = {}
        last = max(t for _, t in pairs)
        for i, block in enumerate(teacher.blocks[:last]):
          if i + 1 in {t for _, t in pairs}:
            teacher_logits[i + 1] = logits_of(block, x)
          if i + 1 < last:
            x = block(x)
      for (s, t), mapping in zip(pairs, mappings):
        mapped = mapping(logits[s].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        loss = loss + config.distill.attn_weight * ((mapped - teacher_logits[t])**2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step, sum(p.numel() for p in trained)


def bench(config: ml_collections.ConfigDict, steps: int, device: str = "cpu") -> dict[str, Any]:
  """Median step time of the PyTorch step on `device` ('cpu': all cores, or 'cuda').

  With model.dtype='bfloat16' the step runs under `torch.autocast(bfloat16)`, the
  usual PyTorch counterpart of JAX's bfloat16 compute with float32 params.
  """
  torch = _torch()
  if config.task not in ("mae", "dmae", "d2mae"):
    raise ValueError(f"--torch times pre-training steps (mae, dmae, d2mae), not {config.task!r}")
  if device == "cuda" and not torch.cuda.is_available():
    raise ValueError("--torch_device=cuda but torch sees no CUDA device")
  if device not in ("cpu", "cuda"):
    raise ValueError(f"--torch_device={device!r}: use 'cpu' or 'cuda'")
  torch.manual_seed(0)
  step, num_params = build_step(config, device)
  rng = np.random.RandomState(0)
  images = torch.from_numpy(rng.standard_normal(
      (config.batch_size, 3, config.image_size, config.image_size)).astype(np.float32))
  images = images.to(device)
  bf16 = config.model.dtype == "bfloat16"

  def timed_step() -> float:
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      step(images)
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  first_s = timed_step()  # warm-up (allocations)
  step_s = float(np.median([timed_step() for _ in range(steps)]))
  return {"torch": torch.__version__, "device": device, "autocast": "bfloat16" if bf16 else "off",
          "threads": torch.get_num_threads(), "trained_params": num_params,
          "first_step_s": first_s, "step_ms": 1e3 * step_s,
          "images_per_sec": config.batch_size / step_s}
