"""What the analyses read: models (a mim_jax workdir or a converted .npz) and image batches.

    model = load_model("/tmp/mim_jax_demo/teacher")          # or "mae_vit_base.npz"
    batches = demo_batches(num_batches=3, batch_size=64, image_size=model.image_size)
    config = data_config("tfds:imagenet2012", split="validation")   # or "folder:/data/in1k"

Batches are dicts {'image': uint8 (B, S, S, 3), 'mask': bool (B,)}; `mask` is False
on the rows that pad the last batch, and every analysis leaves those rows out.
`load_autoencoder` also reads the MAE decoder, for reconstructions.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mim_jax import config_upgrade, io, workdir
from mim_jax.convert import converted
from mim_jax.data import pipeline
from mim_jax.data.sources import default_data_config
from mim_jax.errors import UserError
from mim_jax.models import registry
from mim_jax.models.mae import MAEDecoder, MaskedAutoencoder
from mim_jax.models.vit import VisionTransformer
from mim_jax.analysis.quick_probe import encoder_for
from mim_jax.trainer import sharding

Batch = dict[str, np.ndarray]
DATA_SPECS = "demo | digits | tfds:NAME | folder:PATH"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A ViT encoder (blocks 1..depth, no head) with its params at `image_size`."""
  name: str
  path: str
  model: VisionTransformer
  params: Any
  image_size: int
  sha256: str
  arch: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def layout(self) -> registry.TokenLayout:
    """Prefix tokens and patch grid, from the backbone (a ViT: cls + a square grid)."""
    return registry.get(self.arch.get("backbone", "vit")).token_layout(
        {"patch_size": self.model.patch_size, **self.arch}, self.image_size)

  @property
  def depth(self) -> int:
    return self.model.depth

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  @property
  def patch_size(self) -> int:
    return self.model.patch_size

  @property
  def grid(self) -> int:
    return self.model.grid_size(self.image_size)

  @property
  def num_tokens(self) -> int:
    """Patches plus the prefix (cls) tokens."""
    return self.layout.num_patches + self.layout.prefix_tokens

  def describe(self) -> dict[str, Any]:
    return {"name": self.name, "path": self.path, "sha256": self.sha256,
            "depth": self.depth, "num_heads": self.num_heads, "width": self.model.width,
            "patch_size": self.patch_size, "image_size": self.image_size}


@dataclasses.dataclass(frozen=True)
class LoadedAutoencoder:
  """An MAE (encoder + decoder) and its params {'encoder', 'decoder'}."""
  name: str
  path: str
  model: MaskedAutoencoder
  params: Any
  image_size: int
  norm_pix_loss: bool


def default_name(path: str) -> str:
  base = io.name(path)
  return base[:-len(".npz")] if base.endswith(".npz") else base


def _source(path: str | converted.Converted) -> converted.Converted:
  return path if isinstance(path, converted.Converted) else converted.load_converted(path)


def _image_size(source: converted.Converted, image_size: int | None) -> int:
  size = int(image_size or source.arch["image_size"])
  if size % source.arch["patch_size"]:
    raise UserError(f"image size {size} is not divisible by the patch size "
                    f"{source.arch['patch_size']} of {source.path!r}")
  return size


def load_model(path: str | converted.Converted, image_size: int | None = None,
               name: str | None = None) -> LoadedModel:
  """Reads an encoder: a mim_jax workdir, a checkpoint step dir or a converted .npz.

  Args:
    path: where the weights are, or weights already loaded with `load_converted`.
    image_size: input side in pixels; None = the size the model was trained at.
      A learned position embedding is resized to it.
    name: label for figures and reports; None = the file or directory name.
  """
  source = _source(path)
  size = _image_size(source, image_size)
  model, params = encoder_for(source, size)
  return LoadedModel(name=name or default_name(source.path), path=source.path, model=model,
                     arch=dict(source.arch),
                     params=params, image_size=size, sha256=source.sha256)


def load_autoencoder(path: str, image_size: int | None = None, *,
                     decoder_layer: int | None = None, norm_pix_loss: bool | None = None,
                     name: str | None = None) -> LoadedAutoencoder:
  """Reads an MAE / D-MAE / D²-MAE encoder with its decoder, for reconstructions.

  Args:
    decoder_layer: the block the decoder reads (D²-MAE: 8); None = the run's config for
      a workdir, the last block for a converted file.
    norm_pix_loss: whether the decoder predicts per-patch normalised pixels; None = the
      run's config for a workdir, True (the MAE recipe) for a converted file.

  Raises:
    UserError: the weights have no decoder (an encoder-only conversion or a fine-tuned model).
  """
  source = _source(path)
  arch = source.arch
  if arch["decoder"] is None or "decoder" not in source.params:
    raise UserError(f"{source.path!r} has no MAE decoder (an encoder-only file or a "
                    f"fine-tuned model), so it cannot reconstruct images; give a mim_jax "
                    f"pre-training workdir or a converted *_full.pth MAE checkpoint")
  config = config_upgrade.upgrade(workdir.read_run_config(source.path) or {})
  mae_config = config.get("mae") or {}
  if decoder_layer is None:
    decoder_layer = mae_config.get("decoder_layer")
    if not config and arch["extra_attention_block"]:
      logging.warning("%s is a D²-MAE model: its decoder may read an inner block; set "
                      "decoder_layer (block 8 of 12 in the paper)", source.path)
  if decoder_layer is not None and not 1 <= decoder_layer <= arch["depth"]:
    raise UserError(f"decoder_layer={decoder_layer} is outside the encoder's blocks "
                    f"1..{arch['depth']}")
  if norm_pix_loss is None:
    norm_pix_loss = bool(mae_config.get("norm_pix_loss", True))
  size = _image_size(source, image_size)
  encoder, encoder_params = encoder_for(source, size)
  decoder = MAEDecoder(patch_size=arch["patch_size"], mlp_ratio=arch["mlp_ratio"],
                       **arch["decoder"])
  model = MaskedAutoencoder(encoder=encoder, decoder=decoder, decoder_layer=decoder_layer)
  return LoadedAutoencoder(name=name or default_name(source.path), path=source.path,
                           model=model,
                           params={"encoder": encoder_params,
                                   "decoder": source.params["decoder"]},
                           image_size=size, norm_pix_loss=norm_pix_loss)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def data_config(spec: str = "demo", *, data_dir: str | None = None,
                split: str = "validation", image_size: int | None = None
                ) -> ml_collections.ConfigDict:
  """A data config (mim_jax.data fields) from `demo | digits | tfds:NAME | folder:PATH`.

  `data_dir` is the TFDS data dir (tfds), or where the demo / digits sets are built.
  """
  config = default_data_config()
  config.worker_count = 0  # decoding in-process keeps notebooks free of worker processes
  config.eval_split = split
  kind, _, argument = spec.partition(":")
  if kind == "demo" and not argument:
    config.kind, config.name = "demo", "mim_jax_demo"
  elif kind == "digits" and not argument:
    config.kind, config.name = "digits", "mim_jax_digits"
    config.digits_size = image_size or config.digits_size
  elif kind == "tfds" and argument:
    config.kind, config.name = "tfds", argument
  elif kind == "folder" and argument:
    config.kind = "image_folder"
    data_dir = argument
  else:
    raise UserError(f"unknown data {spec!r}; use {DATA_SPECS}")
  config.data_dir = data_dir
  return config


def batches(config: Any, *, batch_size: int, image_size: int, num_batches: int = 0,
            split: str | None = None) -> Iterator[Batch]:
  """Centre-cropped uint8 batches of one pass over the split (the first `num_batches`;
  0 = all), with 'mask' marking real rows. This process's rows only."""
  if batch_size < 1:
    raise UserError(f"batch size {batch_size} must be positive")
  loader = pipeline.make_eval_loader(config, global_batch_size=batch_size,
                                     image_size=image_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), split=split)
  for index, batch in enumerate(loader):
    if num_batches and index >= num_batches:
      return
    yield batch


def demo_batches(num_batches: int = 3, batch_size: int = 64, image_size: int = 64, *,
                 split: str = "validation") -> list[Batch]:
  """Batches of the embedded demo set (built on first use; 200 validation images)."""
  return list(batches(data_config("demo"), batch_size=batch_size, image_size=image_size,
                      num_batches=num_batches, split=split))


def first_images(config: Any, num_images: int, image_size: int,
                 split: str | None = None) -> np.ndarray:
  """The split's first `num_images` images, uint8 (n, S, S, 3)."""
  if num_images < 1:
    raise UserError(f"num_images={num_images} must be positive")
  batch = next(iter(batches(config, batch_size=num_images, image_size=image_size,
                            num_batches=1, split=split)))
  return batch["image"][batch["mask"]]


# ----------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------
def analysis_mesh() -> jax.sharding.Mesh:
  """All devices on the mesh's batch axis."""
  return sharding.make_mesh(data=-1, fsdp=1)


def check_batch_fits(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  if batch_size % mesh.size:
    raise UserError(f"batch size {batch_size} is not divisible by the {mesh.size} devices; "
                    f"use a multiple of {mesh.size}")


def on_mesh(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """{'image', 'mask'} as global arrays split over the mesh's batch axes."""
  check_batch_fits(len(batch["image"]) * jax.process_count(), mesh)
  return sharding.global_batch({"image": batch["image"], "mask": batch["mask"]}, mesh)


def replicate(params: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(params, sharding.replicated(mesh))
