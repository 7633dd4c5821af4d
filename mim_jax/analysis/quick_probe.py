"""Quick evaluation of a pre-trained encoder on a labelled set: k-NN and ridge probes.

`quick_probe('/tmp/run', data_config)` reads the encoder (a mim_jax workdir or a
converted .npz), embeds the train and validation splits (mean of the final-norm
patch tokens, centre crops, no augmentation) and reports the top-1 of a weighted
k-NN classifier and of a closed-form ridge classifier. Seconds on the digits set:
meant for checks during and after pre-training, not for the paper's numbers
(those come from fine-tuning and linear probing).
"""

from typing import Any

import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import converted, pretrained
from mim_jax.data import pipeline
from mim_jax.objectives import probe
from mim_jax.tasks.base import normalize_images


def encoder_for(source: converted.Converted, image_size: int) -> tuple[Any, Any]:
  """The source's encoder (no head, blocks 1..depth) and params at `image_size`."""
  arch = {**source.arch, "num_classes": 0}
  model = converted.build_encoder(arch)
  # A pre-training input (the mask token), a head and D²-MAE's extra block are not layers.
  params = {k: v for k, v in source.params["encoder"].items()
            if not k.startswith("head") and k not in (f"blocks_{arch['depth']}", "mask_token")}
  grid = image_size // arch["patch_size"]
  if "pos_embed" in params:
    params["pos_embed"] = pretrained.resize_position_embedding(params["pos_embed"], grid)
  params = traverse_util.path_aware_map(
      lambda path, leaf: (pretrained.resize_relative_position_bias(np.asarray(leaf), grid)
                          if path[-1] == pretrained.REL_POS_TABLE else leaf), params)
  return model, params


def split_features(model: Any, params: Any, data_config: Any, split: str,
                   image_size: int, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, d), labels (N,)) of a whole split."""
  loader = pipeline.make_eval_loader(data_config, global_batch_size=batch_size,
                                     image_size=image_size, worker_count=0, split=split,
                                     with_labels=True)

  @jax.jit
  def embed(images):
    tokens = model.apply({"params": params}, normalize_images(images))["tokens"]
    return tokens[:, 1:].mean(axis=1)

  features, labels = [], []
  for batch in loader:
    keep = batch["mask"]
    features.append(np.asarray(embed(jnp.asarray(batch["image"])))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(features), np.concatenate(labels)


def quick_probe(source: str | converted.Converted, data_config: Any, image_size: int, *,
                k: int = 20) -> dict[str, float]:
  """{'knn_top1', 'ridge_top1'} in percent on the validation split.

  `source`: a mim_jax workdir, a converted .npz, or loaded weights.
  """
  if isinstance(source, str):
    source = converted.load_converted(source)
  model, params = encoder_for(source, image_size)
  train_x, train_y = split_features(model, params, data_config, data_config.split, image_size)
  val_x, val_y = split_features(model, params, data_config, data_config.eval_split, image_size)
  num_classes = int(max(train_y.max(), val_y.max())) + 1
  knn = probe.knn_predict(jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(val_x),
                          num_classes, k=k)
  weights, stats = probe.ridge_fit(train_x, train_y, num_classes)
  ridge = probe.ridge_predict(weights, stats, val_x)
  return {"knn_top1": 100.0 * float(np.mean(np.argmax(np.asarray(knn), 1) == val_y)),
          "ridge_top1": 100.0 * float(np.mean(np.argmax(ridge, 1) == val_y))}
