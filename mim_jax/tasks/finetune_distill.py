"""Fine-tuning with a distillation head (DeiT), as MAE-Lite's `finetuning_distill_exp.py`.

The student is the fine-tuning classifier (`tasks.finetune`) plus a second head
that learns from a frozen teacher classifier (`tasks.classifier_teacher`):

* global pooling (`model.pool='gap'`, MAE-Lite's `models_vit.VisionTransformer(
  global_pool=True, distilled=True)`): no extra token; the pooled patch tokens feed
  `fc_norm` -> `head` and the cls token, through its own `dist_norm`, feeds
  `head_dist`;
* cls pooling: DeiT's extra distillation token after the cls token, with its own
  position-embedding slot (started at 0, as the cls slot of the sin-cos table);
  after the final norm the cls token feeds `head` and the distillation token
  `head_dist`. It has no relative position index, so it needs `rel_pos_bias='none'`.

The loss is MAE-Lite's `ModelDistill.forward`: random erasing and mixup / cutmix
first, then the student and the teacher both see the mixed batch;
`(1 - alpha) * CE(head, mixed soft targets, label smoothing included) + alpha *
L_distill(head_dist, teacher)`, with L_distill 'hard' = cross entropy with the
teacher's argmax, or 'soft' = sum KL(teacher_T || student_T) * T^2 / (batch x
classes). Evaluation averages the two heads' logits, as the official model in eval
mode; each head's top-1 is reported too.

Params: {'encoder': the classifier encoder's own leaves (so pre-trained weights
load as in fine-tuning, and the run reads back as a fine-tuned encoder), 'distill':
the distillation head (and DeiT token)}. Layer decay: `distill/dist_token` and its
position slot are layer 0 (timm's `VisionTransformerDistilled` groups it with the
embeddings), the rest of 'distill' is the head's layer.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from ml_collections import config_dict

from mim_jax import flops
from mim_jax.errors import ConfigError
from mim_jax.models import scan
from mim_jax.models.layers import (PARAM_DTYPE, LayerNorm, token_init, token_init_for,
                                   xavier_uniform)
from mim_jax.models.vit import PatchEmbed, VisionTransformer, dense, layer_norm
from mim_jax.objectives import classification
from mim_jax.tasks import classifier_teacher
from mim_jax.tasks.base import LossAux, normalize_images
from mim_jax.tasks.finetune import FinetuneTask, training_inputs
from mim_jax.trainer.tree import path_str

DISTILL_TYPES = ("hard", "soft")
# 'distill' leaves in layer 0 for layer-wise lr decay (the rest: the head's layer).
EMBEDDING_LEAVES = frozenset({"distill/dist_token", "distill/pos_embed"})


def default_config() -> ml_collections.ConfigDict:
  """`config.distill` of distillation-head fine-tuning: MAE-Lite's defaults."""
  return ml_collections.ConfigDict(dict(
      type="hard",  # hard: CE with the teacher's argmax | soft: KL at temperature tau
      alpha=0.5,  # loss = (1 - alpha) * class loss + alpha * distillation loss
      tau=1.0,  # soft distillation temperature
      # A fine-tuned ViT classifier (converted .npz or mim_jax fine-tuning workdir), or with
      # teacher_arch a timm RegNet state_dict (.safetensors or .pth).
      teacher="",
      teacher_arch="regnety_160",  # timm RegNet name (DeiT's teacher); "" = a ViT classifier
      teacher_dtype=config_dict.placeholder(str),  # compute dtype; None = model.dtype
  ))


def hard_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """mean_b CE(student_b, argmax teacher_b): MAE-Lite / DeiT's 'hard' loss, float32."""
  labels = jnp.argmax(teacher_logits, axis=-1)
  log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def soft_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                           tau: float) -> jax.Array:
  """sum KL(softmax(t / T) || softmax(s / T)) * T^2 / (batch * classes): MAE-Lite / DeiT's
  `F.kl_div(..., reduction='sum', log_target=True) * T * T / numel`, float32."""
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student))
  return kl * (tau * tau) / student_logits.size


class DistillationHead(nn.Module):
  """The 'distill' params: `dist_norm` (global pooling) or DeiT's token and its position
  slot (cls pooling), and `head_dist`."""
  num_classes: int
  width: int
  token: bool
  dtype: Any = jnp.float32
  weight_init: str = "mae"

  def setup(self):
    if self.token:
      self.dist_token = self.param("dist_token", token_init, (1, 1, self.width), PARAM_DTYPE)
      self.pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, 1, self.width),
                                  PARAM_DTYPE)
    else:
      self.dist_norm = LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.head_dist = nn.Dense(self.num_classes, kernel_init=xavier_uniform, dtype=jnp.float32,
                              param_dtype=PARAM_DTYPE)

  def token_input(self) -> jax.Array:
    """(1, 1, width): the distillation token with its position embedding."""
    return self.dist_token + self.pos_embed

  def __call__(self, features: jax.Array) -> jax.Array:
    """(B, classes) float32 logits of the distillation token's (B, width) features."""
    if not self.token:
      features = self.dist_norm(features)
    return self.head_dist(features.astype(jnp.float32))


class TokenDistilledViT(VisionTransformer):
  """`VisionTransformer` (pool='cls') with DeiT's distillation token after the cls token.

  Same params as the plain encoder (the token is the caller's input). Returns
  'tokens' (after the final norm), 'logits' (the cls token's head) and
  'dist_features' (the distillation token's output).
  """

  @nn.compact
  def __call__(self, images: jax.Array, *,  # pylint: disable=arguments-differ
               dist_token: jax.Array, train: bool = False) -> dict[str, Any]:
    self.check_options((), None)
    if self.pool != "cls" or self.rel_pos_bias != "none" or not self.num_classes:
      raise ValueError("the distillation token needs pool='cls', a head and no relative "
                       "position bias")
    batch, height = images.shape[:2]
    x = PatchEmbed(self.patch_size, self.width, self.dtype, self.weight_init,
                   name="patch_embed")(images)
    pos = self.position_embedding(self.grid_size(height))
    cls = self.param("cls_token", token_init_for(self.weight_init), (1, 1, self.width),
                     PARAM_DTYPE).astype(x.dtype)
    if pos is not None:
      pos = pos.astype(x.dtype)
      x, cls = x + pos[:, 1:], cls + pos[:, :1]
    prefix = jnp.concatenate([cls, dist_token.astype(x.dtype)], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(prefix, (batch, 2, self.width)), x], axis=1)
    drop_key = self.make_rng("dropout") if train and self.drop_path_rate > 0 else None
    blocks = self._scanned_blocks if self.scan_blocks else self._unrolled_blocks
    x, _, _, _ = blocks(x, (), None, train, drop_key, None, None, 0)
    tokens = layer_norm("norm", self.dtype, self.weight_init)(x)
    logits = dense(self.num_classes, jnp.float32, "head")(tokens[:, 0].astype(jnp.float32))
    return {"tokens": tokens, "logits": logits, "dist_features": tokens[:, 1]}


class DistilledClassifier(nn.Module):
  """The classifier encoder ('encoder') and its distillation head ('distill').

  Returns {'logits': head, 'logits_dist': head_dist}, both (B, classes) float32.
  """
  encoder: VisionTransformer

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    token = isinstance(self.encoder, TokenDistilledViT)
    head = DistillationHead(self.encoder.num_classes, self.encoder.width, token,
                            self.encoder.dtype, self.encoder.weight_init, name="distill")
    if token:
      out = self.encoder(images, dist_token=head.token_input(), train=train)
      features = out["dist_features"]
    else:
      out = self.encoder(images, train=train)
      features = out["tokens"][:, 0]  # pool='gap' tokens are not normed: dist_norm does it
    return {"logits": out["logits"], "logits_dist": head(features)}


def validate_distill(config: ml_collections.ConfigDict) -> None:
  distill = config.get("distill")
  if distill is None or "alpha" not in distill:
    raise ConfigError("task='finetune_distill' needs config.distill (alpha, type, tau, teacher, "
                      "...): use configs/finetune_vit_tiny.py:distill")
  if distill.type not in DISTILL_TYPES:
    raise ConfigError(f"distill.type={distill.type!r} is unknown; choose from {DISTILL_TYPES}")
  if not 0.0 <= distill.alpha <= 1.0:
    raise ConfigError(f"distill.alpha={distill.alpha} must be in [0, 1]")
  if not distill.tau > 0:
    raise ConfigError(f"distill.tau={distill.tau} must be positive")
  if config.model.pool == "cls" and config.model.get("rel_pos_bias", "none") != "none":
    raise ConfigError(f"model.pool='cls' distils through DeiT's extra token, which has no "
                      f"relative position index; use model.pool='gap' (MAE-Lite's distilled "
                      f"ViT) or model.rel_pos_bias='none', not {config.model.rel_pos_bias!r}")


class FinetuneDistillTask(FinetuneTask):
  """Fine-tuning with a distillation head and a frozen teacher classifier (module doc).

  Args:
    random_teacher: a randomly initialised RegNet teacher of `distill.teacher_arch`
      when `distill.teacher` is empty (benchmarks, config checks).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, random_teacher: bool = False):
    validate_distill(config)
    super().__init__(config)
    self.random_teacher = random_teacher
    self.teacher = classifier_teacher.build_teacher(config, random_teacher=random_teacher)

  def build_model(self) -> DistilledClassifier:
    encoder = self.encoder
    if not isinstance(encoder, VisionTransformer):
      raise ConfigError(f"distillation-head fine-tuning needs a ViT encoder, not "
                        f"model.name={self.config.model.name!r}")
    if encoder.pool == "cls":
      encoder = TokenDistilledViT(**{field.name: getattr(encoder, field.name)
                                     for field in dataclasses.fields(VisionTransformer)
                                     if field.name not in ("parent", "name")})
    return DistilledClassifier(encoder)

  def init_params(self, rng: jax.Array) -> Any:
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    model = self.model.clone(encoder=scan.unscanned(self.model.encoder))
    return model.init(rng, images)["params"]

  def encoder_params(self, params: Any) -> Any:
    return params["encoder"]

  def with_encoder_params(self, params: Any, encoder: Any) -> Any:
    return {**params, "encoder": encoder}

  def merge_pretrained(self, params: Any) -> Any:
    params = super().merge_pretrained(params)
    if self.source is not None:
      logging.info("  fresh: the distillation head (%s)", ", ".join(sorted(params["distill"])))
    return params

  def layer_ids(self, params: Any) -> tuple[Any, int]:
    ids, num_layers = super().layer_ids(params)
    ids = jax.tree_util.tree_map_with_path(
        lambda path, i: 0 if path_str(path) in EMBEDDING_LEAVES else i, ids)
    return ids, num_layers

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    variables, meta = classifier_teacher.load_teacher_variables(
        self.teacher, self.config, random_teacher=self.random_teacher)
    return {"teacher": variables}, {"teacher": meta}

  def train_flops_per_image(self) -> float:
    """The student's forward + backward (the DeiT token: one more token in every block)
    and the teacher's forward."""
    encoder = self.encoder
    extra = 2 * encoder.width * self.config.num_classes  # head_dist
    if isinstance(self.model.encoder, TokenDistilledViT):
      tokens = self.num_patches + 1
      extra += encoder.depth * (flops.transformer_block_flops(tokens + 1, encoder.width,
                                                              encoder.mlp_ratio) -
                                flops.transformer_block_flops(tokens, encoder.width,
                                                              encoder.mlp_ratio))
    return (super().train_flops_per_image() + 3 * extra +
            self.teacher.forward_flops(self.config.image_size))

  def forward(self, params: Any, images: jax.Array, **kwargs: Any) -> dict[str, jax.Array]:
    layout = {**params, "encoder": scan.apply_layout(params["encoder"], self.model.encoder)}
    return self.model.apply({"params": layout}, images, **kwargs)

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    """Erasing and mixup, then the student and the teacher on the mixed batch (module doc)."""
    del extra
    distill = self.config.distill
    images, targets, drop_rng = training_inputs(self.config, self.mixup, batch, rng)
    out = self.forward(params, images, train=True, rngs={"dropout": drop_rng})
    loss_class = classification.soft_cross_entropy(out["logits"], targets)
    teacher_logits = self.teacher.logits(frozen["teacher"], images)
    if distill.type == "hard":
      loss_distill = hard_distillation_loss(out["logits_dist"], teacher_logits)
    else:
      loss_distill = soft_distillation_loss(out["logits_dist"], teacher_logits, distill.tau)
    loss = (1.0 - distill.alpha) * loss_class + distill.alpha * loss_distill
    return loss, LossAux({"loss_ce": loss_class, "loss_distill": loss_distill})

  def logits(self, params: Any, images_uint8: jax.Array) -> jax.Array:
    """The average of the two heads' logits (the official model in eval mode)."""
    out = self.forward(params, normalize_images(images_uint8))
    return (out["logits"] + out["logits_dist"]) / 2

  def eval_metrics(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the real examples of the averaged logits (count, top-1/5, cross entropy),
    each head's top-1 hits, and the EMA's averaged-logit sums."""
    del frozen
    images, labels, valid = normalize_images(batch["image"]), batch["label"], batch["mask"]
    out = self.forward(params, images)
    sums = classification.eval_sums((out["logits"] + out["logits_dist"]) / 2, labels, valid)
    for name, head in (("head_top1", "logits"), ("head_dist_top1", "logits_dist")):
      sums[name] = classification.topk_correct(out[head], labels, (1,), valid=valid)["top1"]
    if "ema_params" in extra:
      ema = classification.eval_sums(self.logits(extra["ema_params"], batch["image"]), labels,
                                     valid)
      sums.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
    return sums
