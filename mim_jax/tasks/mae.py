"""MAE pre-training, and D-MAE / D²-MAE when a teacher is added (docs/methods.md, MAE).

MAE drops the masked patches before the encoder (random masking by argsort of
per-image noise), a light decoder fills them back with mask tokens and predicts
every patch's pixels, and the loss is the per-patch-normalised pixel MSE over the
masked patches. D-MAE and D²-MAE are this task plus a `distill.Distiller`: the
frozen teacher sees the student's kept patches, and its attention (and optionally
hidden) layers become extra loss terms.

`mae_loss_terms` is the public entry point for checking numbers against the
PyTorch reference: given params, normalised images and the masking noise it
returns exactly the loss the training step minimises.

Params passed to and returned by everything here are in the per-block layout
(`blocks_{i}`) whether or not the model scans its blocks (`models.scan`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from mim_jax import flops, masking
from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.models import registry, scan
from mim_jax.models.mae import MAEDecoder, MaskedAutoencoder
from mim_jax.objectives import pixels
from mim_jax.tasks.base import LossAux, Task, denormalize_images, normalize_images
from mim_jax.tasks.distill import Distiller

TASK_NAMES = ("mae", "dmae", "d2mae")


def default_config() -> ml_collections.ConfigDict:
  """`config.mae`: the MAE-Lite ViT-Tiny recipe's decoder and target."""
  return ml_collections.ConfigDict(dict(
      norm_pix_loss=True,  # target: each patch's pixels normalised by their mean / std
      decoder=dict(width=96, depth=1, num_heads=3,
                   dtype=config_dict.placeholder(str)),  # compute dtype; None = model.dtype
      decoder_layer=config_dict.placeholder(int),  # the block the decoder reads; None = last
  ))


def decoder_dtype(config: ml_collections.ConfigDict) -> Any:
  """mae.decoder.dtype, or model.dtype when unset."""
  name, key = config.mae.decoder.get("dtype"), "mae.decoder.dtype"
  if not name:
    name, key = config.model.dtype, "model.dtype"
  return registry.compute_dtype(name, key)


def validate_config(config: ml_collections.ConfigDict, depth: int, width: int) -> None:
  """The `config.mae` sub-tree and the mask ratio; the backbone checks its own."""
  if config.task not in TASK_NAMES:
    raise ConfigError(f"task={config.task!r} is not an MAE task {TASK_NAMES}")
  if "distill" in config and config.task == "mae":
    raise ConfigError("config.distill is set but task='mae' has no teacher; use task='dmae' "
                      "or 'd2mae' (configs/dmae_vit_tiny.py, configs/d2mae_vit_tiny.py)")
  if config.task != "mae" and "distill" not in config:
    raise ConfigError(f"task={config.task!r} needs a config.distill sub-tree "
                      f"(configs/{config.task}_vit_tiny.py)")
  mae, patch = config.mae, config.model.patch_size
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f"mask_ratio={config.mask_ratio} must be in (0, 1)")
  if masking.num_kept((config.image_size // patch)**2, config.mask_ratio) < 1:
    raise ConfigError(f"mask_ratio={config.mask_ratio} keeps no patch at image_size="
                      f"{config.image_size}, patch_size={patch}")
  decoder = mae.decoder
  for key, low in (("width", 1), ("depth", 0), ("num_heads", 1)):
    if not isinstance(decoder[key], int) or decoder[key] < low:
      raise ConfigError(f"mae.decoder.{key}={decoder[key]!r} must be an integer >= {low}"
                        + (" (0 = a linear decoder)" if key == "depth" else ""))
  if decoder.width % decoder.num_heads:
    raise ConfigError(f"mae.decoder.width={decoder.width} is not divisible by "
                      f"mae.decoder.num_heads={decoder.num_heads}")
  if decoder.width % 4 or width % 4:
    raise ConfigError("encoder and decoder widths must be divisible by 4 (2-D sin-cos "
                      "position embedding)")
  if mae.decoder_layer is not None and not 1 <= mae.decoder_layer <= depth:
    raise ConfigError(f"mae.decoder_layer={mae.decoder_layer} is outside the encoder's "
                      f"blocks 1..{depth}")
  if config.task == "mae" and mae.decoder_layer not in (None, depth):
    raise ConfigError(f"mae.decoder_layer={mae.decoder_layer} with task='mae' would leave "
                      f"blocks {mae.decoder_layer + 1}..{depth} untrained; it is a D²-MAE "
                      f"setting")
  registry.check_attention_dtype(config.model, decoder_dtype(config), "mae.decoder.dtype")


def build_mae(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
  """The encoder from `config.model` (sin-cos positions) and the decoder of `config.mae`."""
  extra_block = bool("distill" in config and config.distill.extra_attention_block)
  encoder = registry.build_encoder(config.model, posemb="sincos",
                                   extra_attention_block=extra_block)
  dec = config.mae.decoder
  decoder = MAEDecoder(patch_size=config.model.patch_size, width=dec.width, depth=dec.depth,
                       num_heads=dec.num_heads, mlp_ratio=config.model.mlp_ratio,
                       dtype=decoder_dtype(config), remat=config.model.get("remat", "none"),
                       attention_impl=registry.attention_impl(config.model))
  return MaskedAutoencoder(encoder=encoder, decoder=decoder,
                           decoder_layer=config.mae.decoder_layer)


def autoencoder_params(params: dict[str, Any]) -> dict[str, Any]:
  """The {'encoder', 'decoder'} part of a pre-training params tree (drops 'distill')."""
  return {"encoder": params["encoder"], "decoder": params["decoder"]}


def mae_loss_terms(model: MaskedAutoencoder, params: Any, images: jax.Array,
                   noise: jax.Array, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                   capture_layers: tuple[int, ...] = ()
                   ) -> tuple[jax.Array, dict[str, Any]]:
  """MAE loss for normalised `images` (B, H, W, 3) and masking `noise` (B, L).

  Returns (loss, outputs) with outputs 'pred' (B, L, p*p*3), 'mask' (B, L) (1 = masked),
  'ids_keep' (B, K), 'target' (the patchified images, before norm-pix) and 'encoded'
  (the encoder's outputs, with the `capture_layers` asked for). `images` stay float32 for the target
  (the model casts its own copy to its compute dtype); the loss is float32.
  """
  mask = masking.mask_from_noise(noise, mask_ratio)
  variables = {"params": scan.apply_layout(autoencoder_params(params), model)}
  pred, encoded = model.apply(variables, images, mask.ids_keep, mask.ids_restore,
                              capture_layers=capture_layers)
  target = pixels.patchify(images, model.encoder.patch_size)
  loss = pixels.mae_loss(pred, target, mask.mask, norm_pix_loss)
  return loss, {"pred": pred, "mask": mask.mask, "ids_keep": mask.ids_keep, "target": target,
                "encoded": encoded}


class MaeTask(Task):
  """MAE ('mae'), D-MAE ('dmae') and D²-MAE ('d2mae').

  Args:
    random_teacher: (D-MAE / D²-MAE) a randomly initialised teacher of
      `distill.teacher_variant` instead of `distill.teacher` (benchmarks: speed does
      not depend on the weights).
  """

  figure_columns = ("original", "masked", "reconstruction")

  def __init__(self, config: ml_collections.ConfigDict, *, random_teacher: bool = False):
    super().__init__(config)
    self.backbone = registry.get_backbone(config.model)
    self.backbone.validate(config.model, config.image_size)
    shape = self.backbone.shape(config.model)
    validate_config(config, shape["depth"], shape["width"])
    self.model = build_mae(config)
    self.patch_size = config.model.patch_size
    self.num_patches = (config.image_size // self.patch_size)**2
    self.distiller = None
    if config.task != "mae":
      self.distiller = Distiller(config, self.model.encoder, random_teacher=random_teacher)

  @property
  def data_spec(self) -> DataSpec:
    return DataSpec.single_view(self.config.image_size)

  def init_params(self, rng: jax.Array) -> Any:
    """Per-block layout, the same weights for a seed whether or not the blocks are scanned."""
    mae_rng, mapping_rng = jax.random.split(rng)
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    mask = masking.mask_from_noise(jnp.zeros((1, self.num_patches)), self.config.mask_ratio)
    params = scan.unscanned(self.model).init(mae_rng if self.distiller else rng, images,
                                             mask.ids_keep, mask.ids_restore)["params"]
    if self.distiller is not None:
      params = {**params, "distill": self.distiller.init_params(mapping_rng)}
    return params

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher of D-MAE / D²-MAE (none for MAE) and what identifies it."""
    return self.distiller.load_frozen() if self.distiller else ({}, {})

  def train_flops_per_image(self) -> float:
    """Student forward + backward (3x); with a teacher, its forward up to its last used layer."""
    enc, dec = self.model.encoder, self.model.decoder
    kept = masking.num_kept(self.num_patches, self.config.mask_ratio)
    total = flops.mae_train_flops_per_image(self.num_patches, kept, self.patch_size, enc.width,
                                            enc.depth, dec.width, dec.depth, enc.mlp_ratio)
    if self.distiller is not None:
      total += self.distiller.train_flops_per_image(kept)
    return total

  def encoder_arch(self) -> dict[str, Any]:
    dec = self.config.mae.decoder
    arch = self.backbone.arch(self.config.model, self.config.image_size,
                              extra_attention_block=self.model.encoder.extra_attention_block)
    return {**arch, "decoder": {"width": dec.width, "depth": dec.depth,
                                "num_heads": dec.num_heads}}

  def masking_noise(self, rng: jax.Array, batch_size: int) -> jax.Array:
    return jax.random.uniform(rng, (batch_size, self.num_patches))

  def loss_terms(self, params: Any, teacher_params: Any, images: jax.Array,
                 noise: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's loss for normalised images and given masking noise (tests, notebooks).

    `loss = L_rec` (MAE) `+ attn_weight * sum(L_attn) + hidden_weight * sum(L_hidden)`
    (D-MAE / D²-MAE); the terms are float32 whatever the compute dtypes.
    """
    capture = self.distiller.student_layers if self.distiller else ()
    loss, out = mae_loss_terms(self.model, params, images, noise,
                               mask_ratio=self.config.mask_ratio,
                               norm_pix_loss=self.config.mae.norm_pix_loss,
                               capture_layers=capture)
    terms = {"loss_rec": loss}
    if self.distiller is not None:
      extra, distill_terms = self.distiller.loss_terms(
          params["distill"], teacher_params, images, out["ids_keep"], out["encoded"])
      loss = loss + extra
      terms.update(distill_terms)
    return loss, terms

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    del extra
    images = normalize_images(batch["image"])
    loss, terms = self.loss_terms(params, frozen.get("teacher"), images,
                                  self.masking_noise(rng, images.shape[0]))
    return loss, LossAux(terms)

  def reconstruct(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
                  images_uint8: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """Original / masked / reconstructed images in [0, 1] for the figure.

    With norm-pix loss the prediction is mapped back to pixels with each patch's
    own mean and std, as the MAE visualisation does.
    """
    del extra, frozen
    images = normalize_images(images_uint8)
    _, out = mae_loss_terms(self.model, params, images,
                            self.masking_noise(rng, images.shape[0]),
                            mask_ratio=self.config.mask_ratio,
                            norm_pix_loss=self.config.mae.norm_pix_loss)
    pred, target, mask = out["pred"], out["target"], out["mask"][..., None]
    if self.config.mae.norm_pix_loss:
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    unpatch = lambda x: denormalize_images(pixels.unpatchify(x, self.patch_size))
    return {
        "original": unpatch(target),
        "masked": unpatch(target * (1 - mask)),
        "reconstruction": unpatch(pred * mask + target * (1 - mask)),
    }
