"""MaskFeat pre-training (docs/methods.md, MaskFeat): masked tokens predict HOG features.

As facebookresearch/SlowFast's image MaskFeat (`MaskMViT._maskfeat_forward` with
`configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml`): block-wise masks made in the data
workers (BEiT's generator, 40% of the patches, `maskers.blockwise`), the masked patch
tokens replaced by a learned mask token before a ViT with a learned absolute position
embedding, the last block's tokens (no final norm) through a LayerNorm + linear head
to 108 values per 16-px patch (HOG: 2x2 cells of 8 px x 3 colour channels x 9 bins,
`objectives.hog`), and the mean squared error over the masked patches.

HOG is computed on the raw uint8 crop: the reference computes it on the normalised
image, which gives the same features in exact arithmetic (each cell's histogram is
L2-normalised per channel), and the raw pixels make the gradients exact in float32.
`maskfeat_loss` is the public entry point for checking numbers against a reference.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.data.spec import DataSpec
from mim_jax.errors import ConfigError
from mim_jax.maskers.blockwise import BlockwiseMasker
from mim_jax.models import registry, scan
from mim_jax.models.layers import layer_norm
from mim_jax.objectives import hog
from mim_jax.tasks.base import LossAux, Task, normalize_images
from mim_jax.trainer import optim

MASK_KEY = "token_mask"
HEAD_INIT_STD = 0.02


def default_config() -> ml_collections.ConfigDict:
  """`config.maskfeat`: the HOG of the reference (the mask ratio is `config.mask_ratio`)."""
  return ml_collections.ConfigDict(dict(
      hog_bins=9,  # orientation bins over 180 degrees
      hog_cell_size=8,  # pixels per side of a HOG cell
      hog_gaussian_window=0,  # 0 = none, as the reference's HOGLayerC(nbins=9, pool=8)
  ))


def validate_config(config: ml_collections.ConfigDict) -> None:
  mf, patch = config.maskfeat, config.model.patch_size
  for key in ("hog_bins", "hog_cell_size"):
    if not isinstance(mf[key], int) or mf[key] < 1:
      raise ConfigError(f"maskfeat.{key}={mf[key]!r} must be a positive integer")
  if patch % mf.hog_cell_size:
    raise ConfigError(f"model.patch_size={patch} is not a multiple of maskfeat.hog_cell_size="
                      f"{mf.hog_cell_size}")
  if not 0.0 < config.mask_ratio < 1.0:
    raise ConfigError(f"mask_ratio={config.mask_ratio} must be in (0, 1)")


def maskfeat_loss(pred: jax.Array, target: jax.Array, token_mask: jax.Array) -> jax.Array:
  """mean((pred - target)^2) over the masked tokens' values (nn.MSELoss on pred[mask]).

  pred, target: (B, L, D); token_mask (B, L), 1 = masked. float32. A batch with no
  masked token (possible on tiny grids: the generator can fall short) gives 0, where
  the reference's empty mean would be NaN.
  """
  chex.assert_equal_shape([pred, target])
  per_token = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32))**2, axis=-1)
  mask = token_mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MaskFeatTask(Task):
  """MaskFeat (HOG targets) on a backbone with a mask-token input."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.backbone = registry.get_backbone(config.model)
    self.backbone.validate(config.model, config.image_size)
    validate_config(config)
    # The reference deletes the final norm: its head has its own (no pooling is used).
    self.encoder = self.backbone.build(config.model, mask_token=True, posemb="learn",
                                       pool="gap")
    self.patch_size = config.model.patch_size
    self.grid = config.image_size // self.patch_size
    self.num_patches = self.grid**2
    cells = (self.patch_size // config.maskfeat.hog_cell_size)**2
    self.target_size = 3 * config.maskfeat.hog_bins * cells
    self.masker = BlockwiseMasker.maskfeat(self.grid, config.mask_ratio, name=MASK_KEY)

  @property
  def data_spec(self) -> DataSpec:
    return DataSpec.single_view(self.config.image_size, worker_fields=(self.masker,))

  def init_params(self, rng: jax.Array) -> Any:
    """The encoder's init; the head's LayerNorm at (1, 0) and its linear map at
    N(0, 0.02) with zero bias (`MSSeparateHead._init_weights`)."""
    encoder_rng, head_rng = jax.random.split(rng)
    size = self.config.image_size
    encoder = scan.unscanned(self.encoder).init(
        encoder_rng, jnp.zeros((1, size, size, 3)), token_mask=jnp.zeros((1, self.num_patches))
    )["params"]
    width = self.encoder.width
    head = {"norm": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
            "proj": {"kernel": HEAD_INIT_STD * jax.random.truncated_normal(
                head_rng, -2.0 / HEAD_INIT_STD, 2.0 / HEAD_INIT_STD, (width, self.target_size)),
                     "bias": jnp.zeros((self.target_size,))}}
    return {"encoder": encoder, "head": head}

  def weight_decay_mask(self, params: Any) -> Any:
    """SlowFast's ZERO_WD_1D_PARAM (and ZERO_DECAY_POS_CLS off): every leaf of 2+ dims."""
    return optim.finetune_weight_decay_mask(params, no_decay_names=frozenset())

  def train_flops_per_image(self) -> float:
    arch = self.backbone.arch(self.config.model, self.config.image_size)
    forward = self.backbone.forward_flops(arch, self.num_patches)
    return 3 * (forward + 2 * self.num_patches * self.encoder.width * self.target_size)

  def encoder_arch(self) -> dict[str, Any]:
    """A learned position embedding and no final norm (pool 'gap' without fc_norm)."""
    return self.backbone.arch(self.config.model, self.config.image_size, posemb="learn",
                              pool="gap")

  def targets(self, images_uint8: jax.Array) -> jax.Array:
    """(B, L, 108) HOG targets of each patch, raster order (no gradient)."""
    mf = self.config.maskfeat
    return jax.lax.stop_gradient(hog.hog_patch_targets(
        images_uint8, self.patch_size, nbins=mf.hog_bins, cell_size=mf.hog_cell_size,
        gaussian_window=mf.hog_gaussian_window))

  def predict(self, params: Any, images: jax.Array, token_mask: jax.Array) -> jax.Array:
    """(B, L, 108) predictions for normalised images with `token_mask` (B, L) replaced."""
    encoded = self.encoder.apply({"params": scan.apply_layout(params["encoder"], self.encoder)},
                                 images, token_mask=token_mask)
    head = params["head"]
    tokens = layer_norm("norm").apply({"params": head["norm"]}, encoded["tokens"][:, 1:])
    return jnp.dot(tokens.astype(jnp.float32), head["proj"]["kernel"]) + head["proj"]["bias"]

  def loss_terms(self, params: Any, images_uint8: jax.Array,
                 token_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's loss for uint8 images and a (B, g, g) block-wise mask (tests, notebooks)."""
    token_mask = token_mask.reshape(token_mask.shape[0], -1).astype(jnp.float32)
    pred = self.predict(params, normalize_images(images_uint8), token_mask)
    loss = maskfeat_loss(pred, self.targets(images_uint8), token_mask)
    return loss, {"loss_hog": loss}

  def loss_fn(self, params: Any, extra: dict[str, Any], frozen: dict[str, Any],
              batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, LossAux]:
    del extra, frozen, rng
    loss, terms = self.loss_terms(params, batch["image"], batch[MASK_KEY])
    return loss, LossAux(terms)
