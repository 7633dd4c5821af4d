"""Fine-tuning a (pre-trained) ViT for classification (method.md §5).

The model is the encoder with a learned position embedding (started from the
sin-cos table of pre-training), global average pooling + `fc_norm` (or the cls
token) and a linear head; stochastic depth, mixup / cutmix with label smoothing
on device; the weights come from `config.init` (a mim_jax pre-training workdir,
a converted PyTorch checkpoint) or from scratch. The trainer asks this task for
`init_params`, `merge_pretrained`, `loss_fn` and `eval_metrics`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.convert import converted, pretrained
from mim_jax.errors import ConfigError
from mim_jax.models import scan
from mim_jax.models.vit import VARIANTS, VisionTransformer, encoder_kwargs
from mim_jax.objectives import classification
from mim_jax.tasks.pretrain import (attention_impl, compute_dtype, normalize_images,
                                    validate_memory_options)
from mim_jax.trainer import optim


def build_classifier(config: ml_collections.ConfigDict) -> VisionTransformer:
  model = config.model
  return VisionTransformer(
      patch_size=model.patch_size, mlp_ratio=model.mlp_ratio, posemb="learn", pool=model.pool,
      num_classes=config.num_classes, drop_path_rate=model.drop_path_rate,
      dtype=compute_dtype(model.dtype, "model.dtype"), remat=model.get("remat", "none"),
      scan_blocks=model.get("scan_blocks", False), attention_impl=attention_impl(model),
      **encoder_kwargs(model.variant or None, width=model.width, depth=model.depth,
                       num_heads=model.num_heads))


def mixup_config(config: ml_collections.ConfigDict) -> classification.MixupConfig:
  mix = config.mixup
  return classification.MixupConfig(
      num_classes=config.num_classes, mixup_alpha=mix.mixup_alpha,
      cutmix_alpha=mix.cutmix_alpha, prob=mix.prob, switch_prob=mix.switch_prob,
      label_smoothing=mix.label_smoothing)


def validate_classifier(config: ml_collections.ConfigDict) -> None:
  """The checks every classification task (fine-tuning, linear probe) shares."""
  model = config.model
  validate_memory_options(model)
  if model.variant and model.variant not in VARIANTS:
    raise ConfigError(f"model.variant={model.variant!r} is unknown; choose from {sorted(VARIANTS)}")
  if config.image_size % model.patch_size:
    raise ConfigError(f"image_size={config.image_size} is not divisible by "
                      f"model.patch_size={model.patch_size}")
  if model.pool not in ("gap", "cls"):
    raise ConfigError(f"model.pool={model.pool!r}: use 'gap' (mean patch token) or 'cls'")
  if not isinstance(config.num_classes, int) or config.num_classes < 1:
    raise ConfigError(f"num_classes={config.num_classes!r} must be a positive integer")


def validate_config(config: ml_collections.ConfigDict) -> None:
  validate_classifier(config)
  model = config.model
  if not 0.0 <= model.drop_path_rate < 1.0:
    raise ConfigError(f"model.drop_path_rate={model.drop_path_rate} must be in [0, 1)")
  depth = encoder_kwargs(model.variant or None, depth=model.depth).get("depth")
  keep = config.init_keep_blocks
  if keep is not None:
    if not config.init:
      raise ConfigError("init_keep_blocks needs init (the weights whose first blocks to keep)")
    if not 0 <= keep <= depth:
      raise ConfigError(f"init_keep_blocks={keep} is outside 0..{depth}")
  if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
    raise ConfigError(f"ema_decay={config.ema_decay} must be in (0, 1) or None")


class FinetuneTask:
  """Supervised classification, from pre-trained weights or from scratch."""

  needs_labels = True

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.model = build_classifier(config)
    self.num_patches = (config.image_size // config.model.patch_size)**2
    self.mixup = mixup_config(config)
    # Read (and check) the weights now: a wrong path fails before anything is built.
    self.source = converted.load_converted(config.init) if config.init else None
    if self.source is not None:  # shapes only: raises on leaves that do not fit
      pretrained.init_encoder_from(jax.eval_shape(self.init_params, jax.random.PRNGKey(0)),
                                   self.source, keep_blocks=config.init_keep_blocks)

  def init_params(self, rng: jax.Array) -> Any:
    """Per-block layout (`blocks_{i}`), scanned model or not."""
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    return scan.unscanned(self.model).init(rng, images)["params"]

  def merge_pretrained(self, fresh: Any) -> Any:
    """The fresh params with the pre-trained weights put in (host arrays); logs the report."""
    if self.source is None:
      return fresh
    params, report = pretrained.init_encoder_from(fresh, self.source,
                                                  keep_blocks=self.config.init_keep_blocks)
    report.log()
    return params

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    return {}, {}

  def weight_decay_mask(self, params: Any) -> Any:
    """MAE's fine-tuning rule: no weight decay on 1-D params and tokens."""
    return optim.finetune_weight_decay_mask(params)

  def train_flops_per_image(self) -> float:
    from mim_jax import flops  # pylint: disable=g-import-not-at-top
    enc = self.model
    patches = self.num_patches
    forward = flops.vit_encoder_flops(patches, enc.patch_size, enc.width, enc.depth,
                                      enc.mlp_ratio)
    return 3 * (forward + 2 * enc.width * self.config.num_classes)

  def loss_fn(self, params: Any, frozen: dict[str, Any], batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mixup / cutmix, forward with stochastic depth, soft-target cross entropy."""
    del frozen
    mix_rng, drop_rng = jax.random.split(rng)
    images = normalize_images(batch["image"])
    images, targets, _ = classification.mixup_cutmix(mix_rng, images, batch["label"],
                                                     self.mixup)
    out = self.model.apply({"params": scan.apply_layout(params, self.model)}, images, train=True,
                           rngs={"dropout": drop_rng})
    loss = classification.soft_cross_entropy(out["logits"], targets)
    return loss, {"loss_ce": loss}

  def eval_metrics(self, params: Any, frozen: dict[str, Any],
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the real examples of the batch: count, top-1/top-5 hits, cross entropy."""
    del frozen
    logits = self.model.apply({"params": scan.apply_layout(params, self.model)},
                              normalize_images(batch["image"]))["logits"]
    return classification.eval_sums(logits, batch["label"], batch["mask"])
