"""SimMIM pre-training (docs/methods.md, SimMIM): mask tokens in, masked pixels out.

As microsoft/SimMIM's ViT (`VisionTransformerForSimMIM` + `SimMIM`): random 32-px
mask patches (60%) are drawn on the device from noise (`maskers.mask_patches`), the
masked patch tokens are replaced by a learned mask token before the encoder, every
token goes through the encoder, a 1x1 convolution + PixelShuffle (one linear map
per token, `head`) predicts the patch's pixels, and the loss is the L1 distance to
the *normalised* input pixels, summed over masked pixels and channels, divided by
(masked pixels + 1e-5) and by 3.

The encoder is `config.model`'s backbone with SimMIM's ViT options set by the
config file (shared relative position bias, layer scale 0.1, q/v biases, no
absolute position embedding, SimMIM's init, stochastic depth 0.1). `simmim_loss`
is the public entry point for checking numbers against a reference.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.maskers import mask_patches
from mim_jax.models import registry, scan
from mim_jax.tasks.base import LossAux, Task, denormalize_images, normalize_images
from mim_jax.trainer import optim

LOSS_EPS = 1e-5
# SimMIM's ViT `no_weight_decay()`: every other leaf of two or more dimensions (the
# mask token and the relative position bias table included) is decayed.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token"})


def default_config() -> ml_collections.ConfigDict:
  """`config.simmim`: the mask patches of the reference (the ratio is `config.mask_ratio`)."""
  return ml_collections.ConfigDict(dict(
      mask_patch_size=32,  # pixels per side of a mask patch (a multiple of the patch size)
  ))


def validate_config(config: ml_collections.ConfigDict) -> None:
  size, patch = config.image_size, config.model.patch_size
  mask_patch = config.simmim.mask_patch_size
  if not isinstance(mask_patch, int) or mask_patch < 1 or mask_patch % patch:
    raise ConfigError(f"simmim.mask_patch_size={mask_patch!r} must be a positive multiple of "
                      f"model.patch_size={patch}")
  if size % mask_patch:
    raise ConfigError(f"image_size={size} is not divisible by simmim.mask_patch_size="
                      f"{mask_patch}")
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f"mask_ratio={config.mask_ratio} must be in (0, 1)")


def predicted_pixels(pred: jax.Array, patch_size: int, grid: int) -> jax.Array:
  """(B, L, 3*p*p) per-token outputs in PixelShuffle's channel order (c, i, j) ->
  images (B, g*p, g*p, 3), as `nn.PixelShuffle(p)` after the 1x1 conv."""
  batch = pred.shape[0]
  x = pred.reshape(batch, grid, grid, 3, patch_size, patch_size)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, gh, i, gw, j, c)
  return x.reshape(batch, grid * patch_size, grid * patch_size, 3)


def simmim_loss(images: jax.Array, reconstruction: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / 3 over normalised pixels, float32.

  `pixel_mask` (B, H, W): 1 where the pixel's patch was masked (the sum runs over the
  3 channels of each masked pixel, the denominator counts pixels once).
  """
  error = jnp.abs(images.astype(jnp.float32) - reconstruction.astype(jnp.float32))
  mask = pixel_mask.astype(jnp.float32)
  return jnp.sum(error * mask[..., None]) / (jnp.sum(mask) + LOSS_EPS) / 3.0


class SimMIMTask(Task):
  """SimMIM on a backbone with a mask-token input."""

  figure_columns = ("original", "masked", "reconstruction")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.backbone = registry.get_backbone(config.model)
    self.backbone.validate(config.model, config.image_size)
    validate_config(config)
    self.encoder = self.backbone.build(config.model, mask_token=True)
    self.patch_size = config.model.patch_size
    self.grid = config.image_size // self.patch_size
    self.mask_grid = config.image_size // config.simmim.mask_patch_size
    self.mask_scale = config.simmim.mask_patch_size // self.patch_size
    self.num_patches = self.grid**2

  @property
  def data_spec(self) -> DataSpec:
    return DataSpec.single_view(self.config.image_size)

  def init_params(self, rng: jax.Array) -> Any:
    """The encoder's init, and the head at PyTorch's default Conv2d init (the reference
    leaves its decoder there): U(-1/sqrt(width), 1/sqrt(width)), weight and bias."""
    encoder_rng, kernel_rng, bias_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    encoder = scan.unscanned(self.encoder).init(
        encoder_rng, images, token_mask=jnp.zeros((1, self.num_patches)))["params"]
    width, outputs = self.encoder.width, 3 * self.patch_size**2
    bound = 1.0 / width**0.5
    head = {"kernel": jax.random.uniform(kernel_rng, (width, outputs), jnp.float32, -bound,
                                         bound),
            "bias": jax.random.uniform(bias_rng, (outputs,), jnp.float32, -bound, bound)}
    return {"encoder": encoder, "head": head}

  def weight_decay_mask(self, params: Any) -> Any:
    return optim.finetune_weight_decay_mask(params, no_decay_names=NO_DECAY_NAMES)

  def train_flops_per_image(self) -> float:
    arch = self.backbone.arch(self.config.model, self.config.image_size)
    forward = self.backbone.forward_flops(arch, self.num_patches)
    return 3 * (forward + 2 * self.num_patches * self.encoder.width * 3 * self.patch_size**2)

  def encoder_arch(self) -> dict[str, Any]:
    """The encoder without its mask token (a pre-training input, not a layer)."""
    return self.backbone.arch(self.config.model, self.config.image_size)

  def token_mask(self, noise: jax.Array) -> jax.Array:
    """(B, L) 1 = masked, from (B, mask_grid**2) noise."""
    mask = mask_patches.mask_patches_from_noise(noise, mask_ratio=self.config.mask_ratio,
                                                scale=self.mask_scale)
    return mask.reshape(mask.shape[0], -1)

  def masking_noise(self, rng: jax.Array, batch_size: int) -> jax.Array:
    return jax.random.uniform(rng, (batch_size, self.mask_grid**2))

  def reconstruct_pixels(self, params: Any, images: jax.Array, token_mask: jax.Array,
                         rng: jax.Array | None = None) -> jax.Array:
    """The head's pixels (B, H, W, 3) for normalised `images`; stochastic depth with `rng`."""
    train = rng is not None and self.encoder.drop_path_rate > 0
    encoded = self.encoder.apply({"params": scan.apply_layout(params["encoder"], self.encoder)},
                                 images, token_mask=token_mask, train=train,
                                 rngs={"dropout": rng} if train else None)
    tokens = encoded["tokens"][:, 1:]
    head = params["head"]
    pred = jnp.dot(tokens.astype(jnp.float32), head["kernel"]) + head["bias"]
    return predicted_pixels(pred, self.patch_size, self.grid)

  def loss_terms(self, params: Any, images: jax.Array, noise: jax.Array,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's loss for normalised images and given masking noise (tests, notebooks)."""
    token_mask = self.token_mask(noise)
    reconstruction = self.reconstruct_pixels(params, images, token_mask, rng)
    pixel_mask = mask_patches.upsample(token_mask.reshape(-1, self.grid, self.grid),
                                       self.patch_size)
    loss = simmim_loss(images, reconstruction, pixel_mask)
    return loss, {"loss_rec": loss}

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    del extra, frozen
    mask_rng, drop_rng = jax.random.split(rng)
    images = normalize_images(batch["image"])
    loss, terms = self.loss_terms(params, images, self.masking_noise(mask_rng, images.shape[0]),
                                  drop_rng)
    return loss, LossAux(terms)

  def reconstruct(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
                  images_uint8: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    del extra, frozen
    images = normalize_images(images_uint8)
    token_mask = self.token_mask(self.masking_noise(rng, images.shape[0]))
    pred = self.reconstruct_pixels(params, images, token_mask)
    pixel_mask = mask_patches.upsample(token_mask.reshape(-1, self.grid, self.grid),
                                       self.patch_size)[..., None]
    return {"original": denormalize_images(images),
            "masked": denormalize_images(images) * (1 - pixel_mask),
            "reconstruction": denormalize_images(pred * pixel_mask + images * (1 - pixel_mask))}
