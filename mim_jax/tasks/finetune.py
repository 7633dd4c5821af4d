"""Fine-tuning a (pre-trained) backbone for classification (docs/methods.md, fine-tuning).

The model is the encoder with a learned position embedding (started from the
sin-cos table of pre-training), global average pooling + `fc_norm` (or the cls
token) and a linear head; stochastic depth, random erasing (the box from the
workers, the fill on device), mixup / cutmix with label smoothing on device; the
weights come from `config.init` (a mim_jax pre-training workdir, a converted
PyTorch checkpoint) or from scratch; an optional EMA of the weights is the
task's extra state. The ViT options of `config.model` apply as they are: MAE-Lite's
RPE fine-tuning is `qkv_bias='qv'`, `rel_pos_bias='per_block'` with the absolute
position embedding kept (`config_defaults.rpe_overrides`); tables that the
pre-trained weights lack start at zero (`convert.pretrained`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.convert import converted, pretrained
from mim_jax.data import random_erasing
from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.models import registry, scan
from mim_jax.objectives import classification
from mim_jax.tasks.base import LossAux, Task, ema_update, normalize_images
from mim_jax.trainer import optim
from mim_jax.trainer.tree import path_str


def build_classifier_encoder(config: ml_collections.ConfigDict, *, num_classes: int,
                             drop_path_rate: float = 0.0, remat: str = "none") -> Any:
  """The backbone of fine-tuning and linear probing: a learned position embedding started
  from the sin-cos table of pre-training, `model.pool` pooling and `num_classes` outputs
  (0: features only)."""
  return registry.build_encoder(config.model, posemb="learn", pool=config.model.pool,
                                num_classes=num_classes, drop_path_rate=drop_path_rate,
                                remat=remat)


def mixup_config(config: ml_collections.ConfigDict) -> classification.MixupConfig:
  mix = config.mixup
  return classification.MixupConfig(
      num_classes=config.num_classes, mixup_alpha=mix.mixup_alpha,
      cutmix_alpha=mix.cutmix_alpha, prob=mix.prob, switch_prob=mix.switch_prob,
      label_smoothing=mix.label_smoothing)


def erase_box_field(config: ml_collections.ConfigDict) -> random_erasing.EraseBox | None:
  """The worker field of `config.random_erasing` (None when off or the config predates it)."""
  erasing = config.get("random_erasing")
  if erasing is None or not erasing.prob:
    return None
  return random_erasing.EraseBox(config.image_size, probability=float(erasing.prob))


def validate_random_erasing(config: ml_collections.ConfigDict) -> None:
  erasing = config.get("random_erasing")
  if erasing is None:
    return
  prob = erasing.prob
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
    raise ConfigError(f"random_erasing.prob={prob!r} must be in [0, 1] (MAE's recipe: 0.25; "
                      f"0 = off)")
  if erasing.mode not in random_erasing.MODES:
    raise ConfigError(f"random_erasing.mode={erasing.mode!r} is unknown; choose from "
                      f"{random_erasing.MODES}")


def training_inputs(config: ml_collections.ConfigDict, mixup: classification.MixupConfig,
                    batch: dict[str, jax.Array], rng: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(images, soft targets, stochastic-depth key) of a training batch, in MAE-Lite's order:
  normalise, erase (timm's loader erases normalised tensors), then mixup / cutmix (in the
  model wrapper, on the erased batch)."""
  mix_rng, drop_rng = jax.random.split(rng)
  images = normalize_images(batch["image"])
  if erase_box_field(config) is not None:
    if "erase_box" not in batch:
      raise ConfigError(
          f"random_erasing.prob={config.random_erasing.prob} needs the worker field "
          f"'erase_box' in the batch, which this input pipeline does not deliver; set "
          f"--config.random_erasing.prob=0")
    images = random_erasing.erase(images, batch["erase_box"], jax.random.fold_in(rng, 2),
                                  config.random_erasing.mode)
  images, targets, _ = classification.mixup_cutmix(mix_rng, images, batch["label"], mixup)
  return images, targets, drop_rng


def validate_classifier(config: ml_collections.ConfigDict) -> None:
  """The checks every classification task (fine-tuning, linear probe) shares."""
  model = config.model
  registry.get_backbone(model).validate(model, config.image_size)
  if model.pool not in ("gap", "cls"):
    raise ConfigError(f"model.pool={model.pool!r}: use 'gap' (mean patch token) or 'cls'")
  if not isinstance(config.num_classes, int) or config.num_classes < 1:
    raise ConfigError(f"num_classes={config.num_classes!r} must be a positive integer")


def validate_config(config: ml_collections.ConfigDict) -> None:
  validate_classifier(config)
  model = config.model
  if not 0.0 <= model.drop_path_rate < 1.0:
    raise ConfigError(f"model.drop_path_rate={model.drop_path_rate} must be in [0, 1)")
  depth = registry.get_backbone(model).shape(model)["depth"]
  keep = config.init_keep_blocks
  if keep is not None:
    if not config.init:
      raise ConfigError("init_keep_blocks needs init (the weights whose first blocks to keep)")
    if not 0 <= keep <= depth:
      raise ConfigError(f"init_keep_blocks={keep} is outside 0..{depth}")
  if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
    raise ConfigError(f"ema_decay={config.ema_decay} must be in (0, 1) or None")
  validate_random_erasing(config)


class FinetuneTask(Task):
  """Supervised classification, from pre-trained weights or from scratch.

  With `ema_decay`, the extra state 'ema_params' follows the params after every
  update (timm's ModelEmaV2) and is evaluated too (val_ema_*).
  """

  evaluates = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    validate_config(config)
    self.backbone = registry.get_backbone(config.model)
    self.encoder = build_classifier_encoder(config, num_classes=config.num_classes,
                                            drop_path_rate=config.model.drop_path_rate,
                                            remat=config.model.get("remat", "none"))
    self.model = self.build_model()
    self.num_patches = (config.image_size // config.model.patch_size)**2
    self.mixup = mixup_config(config)
    # Read (and check) the weights now: a wrong path fails before anything is built.
    self.source = converted.load_converted(config.init) if config.init else None
    if self.source is not None:  # shapes only: raises on leaves that do not fit
      fresh = jax.eval_shape(self.init_params, jax.random.PRNGKey(0))
      pretrained.init_encoder_from(self.encoder_params(fresh), self.source,
                                   keep_blocks=config.init_keep_blocks)

  def build_model(self) -> Any:
    """The module trained (params = `init_params`); here the classifier encoder itself."""
    return self.encoder

  def encoder_params(self, params: Any) -> Any:
    """The encoder's part of the task's params (all of them here)."""
    return params

  def with_encoder_params(self, params: Any, encoder: Any) -> Any:
    """`params` with the encoder's part replaced."""
    del params
    return encoder

  @property
  def data_spec(self) -> DataSpec:
    """One augmented labelled view, and the random-erasing box when erasing is on."""
    field = erase_box_field(self.config)
    return DataSpec.single_view(self.config.image_size, labels=True, augment=True,
                                worker_fields=() if field is None else (field,))

  def init_params(self, rng: jax.Array) -> Any:
    """Per-block layout (`blocks_{i}`), scanned model or not."""
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    return scan.unscanned(self.model).init(rng, images)["params"]

  def merge_pretrained(self, params: Any) -> Any:
    """The fresh params with the pre-trained weights put in (host arrays); logs the report."""
    if self.source is None:
      return params
    encoder, report = pretrained.init_encoder_from(self.encoder_params(params), self.source,
                                                   keep_blocks=self.config.init_keep_blocks)
    report.log()
    return self.with_encoder_params(params, encoder)

  def weight_decay_mask(self, params: Any) -> Any:
    """MAE's fine-tuning rule: no weight decay on 1-D params and tokens."""
    return optim.finetune_weight_decay_mask(params)

  def layer_ids(self, params: Any) -> tuple[Any, int]:
    num_layers = self.backbone.shape(self.config.model)["depth"]
    ids = jax.tree_util.tree_map_with_path(
        lambda path, _: self.backbone.layer_id(path_str(path), num_layers), params)
    return ids, num_layers

  def encoder_arch(self) -> dict[str, Any]:
    model = self.config.model
    return self.backbone.arch(model, self.config.image_size, posemb="learn", pool=model.pool,
                              num_classes=self.config.num_classes)

  def init_extra(self, params: Any) -> dict[str, Any]:
    return {} if self.config.ema_decay is None else {"ema_params": params}

  def update_extra(self, extra: dict[str, Any], params: Any, updates: Any,
                   step: jax.Array) -> dict[str, Any]:
    del updates, step
    if self.config.ema_decay is None:
      return extra
    return {"ema_params": ema_update(extra["ema_params"], params, self.config.ema_decay)}

  def train_flops_per_image(self) -> float:
    forward = self.backbone.forward_flops(
        self.backbone.arch(self.config.model, self.config.image_size), self.num_patches)
    return 3 * (forward + 2 * self.encoder.width * self.config.num_classes)

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    """Random erasing, mixup / cutmix, forward with stochastic depth, soft-target cross
    entropy."""
    del extra, frozen
    images, targets, drop_rng = training_inputs(self.config, self.mixup, batch, rng)
    out = self.model.apply({"params": scan.apply_layout(params, self.model)}, images, train=True,
                           rngs={"dropout": drop_rng})
    loss = classification.soft_cross_entropy(out["logits"], targets)
    return loss, LossAux({"loss_ce": loss})

  def logits(self, params: Any, images_uint8: jax.Array) -> jax.Array:
    return self.model.apply({"params": scan.apply_layout(params, self.model)},
                            normalize_images(images_uint8))["logits"]

  def eval_metrics(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the real examples: count, top-1/top-5 hits, cross entropy (and the EMA's)."""
    del frozen
    sums = classification.eval_sums(self.logits(params, batch["image"]), batch["label"],
                                    batch["mask"])
    if "ema_params" in extra:
      ema = classification.eval_sums(self.logits(extra["ema_params"], batch["image"]),
                                     batch["label"], batch["mask"])
      sums.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
    return sums
