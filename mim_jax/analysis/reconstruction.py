"""MAE reconstructions of a few images: original / masked / reconstructed, in [0, 1].

    autoencoder = load_autoencoder("/tmp/mim_jax_demo/teacher")
    views = reconstruct(autoencoder, images, mask_ratio=0.75, seed=0)
"""

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.analysis import inputs
from mim_jax.errors import UserError
from mim_jax.objectives import pixels
from mim_jax.tasks.base import denormalize_images, normalize_images
from mim_jax.tasks.mae import mae_loss_terms

VIEWS = ("original", "masked", "reconstruction")


def reconstruct(autoencoder: inputs.LoadedAutoencoder, images: np.ndarray, *,
                mask_ratio: float = 0.75, seed: int = 0) -> dict[str, np.ndarray]:
  """{'original', 'masked', 'reconstruction'}: (n, S, S, 3) floats in [0, 1].

  `images`: uint8 (n, S, S, 3) at the autoencoder's image size. Visible patches are
  pasted back into the reconstruction; with norm-pix loss each predicted patch is
  mapped back to pixels with the original patch's mean and std (as MAE's figures do).
  """
  if images.ndim != 4 or images.shape[1:3] != (autoencoder.image_size,) * 2:
    raise UserError(f"images of shape {images.shape}; the autoencoder reads "
                    f"({autoencoder.image_size}, {autoencoder.image_size}, 3) images")
  num_patches = autoencoder.model.encoder.grid_size(autoencoder.image_size)**2
  if not 0.0 < mask_ratio < 1.0 or masking.num_kept(num_patches, mask_ratio) < 1:
    raise UserError(f"mask_ratio={mask_ratio} must be in (0, 1) and keep at least one of "
                    f"the {num_patches} patches")
  patch_size = autoencoder.model.encoder.patch_size

  @jax.jit
  def views(params, images_uint8, rng):
    normalised = normalize_images(images_uint8)
    noise = jax.random.uniform(rng, (normalised.shape[0], num_patches))
    _, out = mae_loss_terms(autoencoder.model, params, normalised, noise,
                            mask_ratio=mask_ratio, norm_pix_loss=autoencoder.norm_pix_loss)
    pred, target, mask = out["pred"], out["target"], out["mask"][..., None]
    if autoencoder.norm_pix_loss:
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    unpatch = lambda x: denormalize_images(pixels.unpatchify(x, patch_size))
    return {"original": unpatch(target), "masked": unpatch(target * (1 - mask)),
            "reconstruction": unpatch(pred * mask + target * (1 - mask))}

  out = jax.device_get(views(autoencoder.params, jnp.asarray(images),
                             jax.random.PRNGKey(seed)))
  return {name: np.asarray(out[name]) for name in VIEWS}
