"""MAE pre-training: the model from a config and the pure loss function of one batch.

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
import numpy as np

from mim_jax import flops, masking
from mim_jax.errors import ConfigError
from mim_jax.models import scan, vit
from mim_jax.models.mae import MAEDecoder, MaskedAutoencoder
from mim_jax.models.vit import VARIANTS, VisionTransformer, encoder_kwargs
from mim_jax.objectives import reconstruction

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 normalised with the ImageNet mean and std."""
  return (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize_images(images: jax.Array) -> jax.Array:
  """Inverse of `normalize_images`, clipped to [0, 1]."""
  return jnp.clip(images * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def compute_dtype(name: str | None, key: str) -> Any:
  """A config's compute dtype ('float32' | 'bfloat16') as a jnp dtype; errors name `key`."""
  try:
    return vit.compute_dtype(name)
  except ValueError:
    raise ConfigError(f"{key}={name!r} is not a compute dtype; choose from "
                      f"{vit.COMPUTE_DTYPES} (params stay float32 either way)") from None


def decoder_dtype(model: ml_collections.ConfigDict) -> Any:
  """model.decoder.dtype, or model.dtype when unset."""
  if model.decoder.get("dtype"):
    return compute_dtype(model.decoder.dtype, "model.decoder.dtype")
  return compute_dtype(model.dtype, "model.dtype")


def attention_impl(model: ml_collections.ConfigDict) -> str:
  """model.attention_impl ('explicit' when the config predates it)."""
  return model.get("attention_impl", "explicit")


def check_attention_dtype(impl: str, dtype: Any, key: str) -> None:
  """cuDNN's fused attention needs a GPU and 16-bit inputs (here bfloat16: float16 is refused)."""
  if impl != "cudnn":
    return
  if jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' needs a GPU, but JAX runs on "
                      f"{jax.default_backend()!r}; use 'xla' or 'explicit'")
  if dtype != jnp.bfloat16:
    raise ConfigError(f"model.attention_impl='cudnn' needs bfloat16 compute, but {key} is "
                      f"{jnp.dtype(dtype).name}")


def validate_memory_options(model: ml_collections.ConfigDict) -> None:
  """model.dtype, model.remat (if the config has it), model.scan_blocks, model.attention_impl."""
  dtype = compute_dtype(model.dtype, "model.dtype")
  impl = attention_impl(model)
  if impl not in vit.ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl={impl!r} is unknown; choose from "
                      f"{vit.ATTENTION_IMPLS}")
  check_attention_dtype(impl, dtype, "model.dtype")
  remat = model.get("remat", "none")
  if remat not in vit.REMAT_POLICIES:
    raise ConfigError(f"model.remat={remat!r} is unknown; choose from "
                      f"{sorted(vit.REMAT_POLICIES)}")
  if not isinstance(model.get("scan_blocks", False), bool):
    raise ConfigError(f"model.scan_blocks={model.scan_blocks!r} must be True or False")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that cannot work, before anything is built or written."""
  model = config.model
  validate_memory_options(model)
  check_attention_dtype(attention_impl(model), decoder_dtype(model), "model.decoder.dtype")
  if model.variant and model.variant not in VARIANTS:
    raise ConfigError(f"model.variant={model.variant!r} is unknown; choose from "
                      f"{sorted(VARIANTS)} (or set model.width/depth/num_heads)")
  enc = encoder_kwargs(model.variant, width=model.width, depth=model.depth,
                       num_heads=model.num_heads)
  for key in ("width", "depth", "num_heads"):
    if key not in enc:
      raise ConfigError(f"model.{key} is not set and model.variant is empty")
  if config.image_size % model.patch_size:
    raise ConfigError(f"image_size={config.image_size} is not divisible by "
                      f"model.patch_size={model.patch_size}")
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f"mask_ratio={config.mask_ratio} must be in (0, 1)")
  if masking.num_kept((config.image_size // model.patch_size)**2, config.mask_ratio) < 1:
    raise ConfigError(f"mask_ratio={config.mask_ratio} keeps no patch at image_size="
                      f"{config.image_size}, patch_size={model.patch_size}")
  if enc["width"] % enc["num_heads"]:
    raise ConfigError(f"model width {enc['width']} is not divisible by num_heads "
                      f"{enc['num_heads']}")
  if model.decoder.width % model.decoder.num_heads:
    raise ConfigError(f"model.decoder.width={model.decoder.width} is not divisible by "
                      f"model.decoder.num_heads={model.decoder.num_heads}")
  if model.decoder.width % 4 or enc["width"] % 4:
    raise ConfigError("encoder and decoder widths must be divisible by 4 (2-D sin-cos "
                      "position embedding)")
  if model.decoder_layer is not None and not 1 <= model.decoder_layer <= enc["depth"]:
    raise ConfigError(f"model.decoder_layer={model.decoder_layer} is outside the encoder's "
                      f"blocks 1..{enc['depth']}")
  if config.task == "mae":
    _reject_distillation_settings(config, enc["depth"])


def _reject_distillation_settings(config: ml_collections.ConfigDict, depth: int) -> None:
  """Plain MAE has no teacher: settings that only distillation reads are errors, not no-ops."""
  if config.distill.teacher:
    raise ConfigError("distill.teacher is set but task='mae' has no teacher; use "
                      "task='dmae' or 'd2mae', or unset distill.teacher")
  if config.model.extra_attention_block:
    raise ConfigError("model.extra_attention_block only feeds D²-MAE's distillation; "
                      "use task='d2mae'")
  if config.model.decoder_layer not in (None, depth):
    raise ConfigError(f"model.decoder_layer={config.model.decoder_layer} with task='mae' "
                      f"would leave blocks {config.model.decoder_layer + 1}..{depth} "
                      f"untrained; it is a D²-MAE setting")


def build_mae(model_config: ml_collections.ConfigDict) -> MaskedAutoencoder:
  remat = model_config.get("remat", "none")
  encoder = VisionTransformer(
      patch_size=model_config.patch_size, mlp_ratio=model_config.mlp_ratio,
      dtype=compute_dtype(model_config.dtype, "model.dtype"), remat=remat,
      scan_blocks=model_config.get("scan_blocks", False),
      attention_impl=attention_impl(model_config),
      extra_attention_block=model_config.extra_attention_block,
      **encoder_kwargs(model_config.variant, width=model_config.width,
                       depth=model_config.depth, num_heads=model_config.num_heads))
  decoder = MAEDecoder(patch_size=model_config.patch_size, width=model_config.decoder.width,
                       depth=model_config.decoder.depth,
                       num_heads=model_config.decoder.num_heads,
                       mlp_ratio=model_config.mlp_ratio, dtype=decoder_dtype(model_config),
                       remat=remat, attention_impl=attention_impl(model_config))
  return MaskedAutoencoder(encoder=encoder, decoder=decoder,
                           decoder_layer=model_config.decoder_layer)


def autoencoder_params(params: dict[str, Any]) -> dict[str, Any]:
  """The {'encoder', 'decoder'} part of a pre-training params tree (drops 'distill')."""
  return {"encoder": params["encoder"], "decoder": params["decoder"]}


def mae_loss_terms(model: MaskedAutoencoder, params: Any, images: jax.Array,
                   noise: jax.Array, *, mask_ratio: float = 0.75,
                   norm_pix_loss: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MAE loss for normalised `images` (B, H, W, 3) and masking `noise` (B, L).

  Returns (loss, outputs) with outputs 'pred' (B, L, p*p*3), 'mask' (B, L) and
  'target' (the patchified images, before norm-pix). `images` stay float32 for the
  target (the model casts its own copy to its compute dtype); the loss is float32.
  """
  mask = masking.mask_from_noise(noise, mask_ratio)
  variables = {"params": scan.apply_layout(autoencoder_params(params), model)}
  pred, _ = model.apply(variables, images, mask.ids_keep, mask.ids_restore)
  target = reconstruction.patchify(images, model.encoder.patch_size)
  loss = reconstruction.mae_loss(pred, target, mask.mask, norm_pix_loss)
  return loss, {"pred": pred, "mask": mask.mask, "target": target}


class MaePretrainTask:
  """Plain MAE: what the trainer needs to know about the model, and nothing more."""

  figure_columns = ("original", "masked", "reconstruction")

  def __init__(self, config: ml_collections.ConfigDict):
    validate_config(config)
    self.config = config
    self.model = build_mae(config.model)
    self.patch_size = config.model.patch_size
    self.num_patches = (config.image_size // self.patch_size)**2

  def init_params(self, rng: jax.Array) -> Any:
    """Per-block layout, the same weights for a seed whether or not the blocks are scanned."""
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    mask = masking.mask_from_noise(jnp.zeros((1, self.num_patches)), self.config.mask_ratio)
    return scan.unscanned(self.model).init(rng, images, mask.ids_keep,
                                           mask.ids_restore)["params"]

  def train_flops_per_image(self) -> float:
    """Analytic matmul FLOPs of one training example (forward + backward)."""
    enc, dec = self.model.encoder, self.model.decoder
    kept = masking.num_kept(self.num_patches, self.config.mask_ratio)
    return flops.mae_train_flops_per_image(self.num_patches, kept, self.patch_size, enc.width,
                                           enc.depth, dec.width, dec.depth, enc.mlp_ratio)

  def masking_noise(self, rng: jax.Array, batch_size: int) -> jax.Array:
    return jax.random.uniform(rng, (batch_size, self.num_patches))

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """Frozen inputs of the step (none for MAE) and what identifies them in checkpoints."""
    return {}, {}

  def loss_fn(self, params: Any, frozen: dict[str, Any], batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pure: (params, frozen, uint8 batch, step rng) -> (loss, named loss terms)."""
    del frozen
    images = normalize_images(batch["image"])
    noise = self.masking_noise(rng, images.shape[0])
    loss, _ = mae_loss_terms(self.model, params, images, noise,
                             mask_ratio=self.config.mask_ratio,
                             norm_pix_loss=self.config.norm_pix_loss)
    return loss, {"loss_rec": loss}

  def reconstruct(self, params: Any, images_uint8: jax.Array,
                  rng: jax.Array) -> dict[str, jax.Array]:
    """Original / masked / reconstructed images in [0, 1] for the figure.

    With norm-pix loss the prediction is mapped back to pixels with each patch's
    own mean and std, as the MAE visualisation does.
    """
    images = normalize_images(images_uint8)
    noise = self.masking_noise(rng, images.shape[0])
    _, out = mae_loss_terms(self.model, params, images, noise,
                            mask_ratio=self.config.mask_ratio,
                            norm_pix_loss=self.config.norm_pix_loss)
    pred, target, mask = out["pred"], out["target"], out["mask"][..., None]
    if self.config.norm_pix_loss:
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    unpatch = lambda x: denormalize_images(reconstruction.unpatchify(x, self.patch_size))
    return {
        "original": unpatch(target),
        "masked": unpatch(target * (1 - mask)),
        "reconstruction": unpatch(pred * mask + target * (1 - mask)),
    }
