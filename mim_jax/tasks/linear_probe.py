"""Linear probing of a frozen pre-trained encoder: MAE's protocol (docs/methods.md).

The encoder is a frozen input of the step, like a distillation teacher: it is
not differentiated, has no optimizer state, is not checkpointed (its path and
content hash are), and so stays bit-identical. The trained part is MAE's
`head = Sequential(BatchNorm1d(d, affine=False, eps=1e-6), Linear(d, classes))`
on the pooled feature:

* `pool='cls'` (MAE's default for linear probing): the final-norm cls token;
* `pool='gap'`: mean of the patch tokens, normalised without affine (MAE's
  freshly made, frozen `fc_norm`, which is the identity affine).

BatchNorm normalises with the statistics of the global batch in training (a
synchronised BatchNorm; MAE's per-GPU BatchNorm sees 1/num_gpus of it) and keeps
running statistics like torch (momentum 0.1, unbiased variance) for evaluation;
they are the task's extra state 'model_state'. The head's kernel starts from a normal of
std 0.01 (MAE's `trunc_normal_(std=0.01)`: at 2 sigma the truncation is immaterial
at this std, so the normal is used), its bias at 0.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mim_jax.convert import converted, pretrained
from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.models import registry, scan
from mim_jax.objectives import classification
from mim_jax.tasks.base import LossAux, Task, normalize_images
from mim_jax.tasks.finetune import build_classifier_encoder, validate_classifier

BATCHNORM_EPS = 1e-6
BATCHNORM_MOMENTUM = 0.1  # torch's: running = (1 - m) * running + m * batch statistic
HEAD_INIT_STD = 0.01


def batchnorm_train(features: jax.Array, running: dict[str, jax.Array],
                    momentum: float = BATCHNORM_MOMENTUM, eps: float = BATCHNORM_EPS
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """torch BatchNorm1d(affine=False) in training: (normalised, updated running stats).

  Normalises with the biased batch variance; the running variance is updated with
  the unbiased one, as torch does.
  """
  features = features.astype(jnp.float32)
  count = features.shape[0]
  mean = features.mean(axis=0)
  var = features.var(axis=0)
  updated = {"mean": (1 - momentum) * running["mean"] + momentum * mean,
             "var": (1 - momentum) * running["var"] + momentum * var * count / max(count - 1, 1)}
  return (features - mean) * jax.lax.rsqrt(var + eps), updated


def batchnorm_eval(features: jax.Array, running: dict[str, jax.Array],
                   eps: float = BATCHNORM_EPS) -> jax.Array:
  return (features.astype(jnp.float32) - running["mean"]) * jax.lax.rsqrt(running["var"] + eps)


def validate_config(config: ml_collections.ConfigDict) -> None:
  model = config.model
  if model.get("remat", "none") != "none":
    raise ConfigError(f"model.remat={model.remat!r}: the probed encoder is frozen (no "
                      f"backward pass), so there is nothing to rematerialise")
  validate_classifier(config)


class LinearProbeTask(Task):
  """A BatchNorm + linear classifier on the pooled features of a frozen encoder."""

  evaluates = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    validate_config(config)
    self.encoder = build_classifier_encoder(config, num_classes=0)
    self.width = self.encoder.width
    self.num_patches = (config.image_size // config.model.patch_size)**2
    # Read (and check) the weights now: a wrong path fails before anything is built.
    self.source = converted.load_converted(config.init) if config.init else None
    self.encoder_params = self._encoder_params()

  @property
  def data_spec(self) -> DataSpec:
    return DataSpec.single_view(self.config.image_size, labels=True, augment=True)

  def _encoder_params(self) -> Any:
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    fresh = jax.device_get(scan.unscanned(self.encoder).init(
        jax.random.PRNGKey(self.config.seed), images)["params"])
    if self.source is None:
      logging.warning("Linear probe of a randomly initialised encoder (seed %d): config.init "
                      "is empty", self.config.seed)
      return fresh
    params, report = pretrained.init_encoder_from(fresh, self.source)
    report.log()
    return params

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder, and what identifies it for resuming (path and content hash)."""
    path = self.config.init or f"random init (seed {self.config.seed})"
    return ({"encoder": self.encoder_params},
            {"encoder": {"path": path, "sha256": converted.content_hash(self.encoder_params)}})

  def init_params(self, rng: jax.Array) -> Any:
    kernel = HEAD_INIT_STD * jax.random.normal(rng, (self.width, self.config.num_classes))
    return {"head": {"kernel": kernel, "bias": jnp.zeros((self.config.num_classes,))}}

  def init_extra(self, params: Any) -> dict[str, Any]:
    """BatchNorm running statistics, torch's initial values."""
    del params
    return {"model_state": {"mean": jnp.zeros((self.width,)), "var": jnp.ones((self.width,))}}

  def update_extra(self, extra: dict[str, Any], params: Any, updates: Any,
                   step: jax.Array) -> dict[str, Any]:
    """The running statistics the loss computed from this batch."""
    del extra, params, step
    return {"model_state": updates}

  def weight_decay_mask(self, params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)

  def features(self, encoder_params: Any, images: jax.Array) -> jax.Array:
    """(B, d) pooled features of uint8 images; no gradient flows into the encoder."""
    params = scan.apply_layout(jax.lax.stop_gradient(encoder_params), self.encoder)
    tokens = self.encoder.apply({"params": params},
                                normalize_images(images))["tokens"].astype(jnp.float32)
    if self.config.model.pool == "cls":
      return tokens[:, 0]
    pooled = tokens[:, 1:].mean(axis=1)
    mean = pooled.mean(axis=-1, keepdims=True)
    var = pooled.var(axis=-1, keepdims=True)
    return (pooled - mean) * jax.lax.rsqrt(var + 1e-6)

  def train_flops_per_image(self) -> float:
    """The frozen encoder's forward, the head's forward and backward."""
    backbone = registry.get_backbone(self.config.model)
    forward = backbone.forward_flops(backbone.arch(self.config.model, self.config.image_size),
                                     self.num_patches)
    return forward + 3 * 2 * self.width * self.config.num_classes

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    """Cross entropy of BatchNorm(features) @ head; the updated statistics go to `updates`."""
    del rng
    features = self.features(frozen["encoder"], batch["image"])
    normed, running = batchnorm_train(features, extra["model_state"])
    logits = normed @ params["head"]["kernel"] + params["head"]["bias"]
    targets = classification.one_hot_smoothed(batch["label"], self.config.num_classes)
    loss = classification.soft_cross_entropy(logits, targets)
    return loss, LossAux({"loss_ce": loss}, running)

  def eval_metrics(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    features = self.features(frozen["encoder"], batch["image"])
    logits = batchnorm_eval(features, extra["model_state"]) @ params["head"]["kernel"]
    logits = logits + params["head"]["bias"]
    return classification.eval_sums(logits, batch["label"], batch["mask"])
