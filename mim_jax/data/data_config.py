"""The data config: every field the data pipeline reads, their defaults, and `DataError`.

Config files start from `default_data_config()`; code reads a field through
`config_value`, so a partial config (a dict with a few keys, or a config
written before a field existed) gets the default of every field it lacks.
"""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from mim_jax.errors import UserError


class DataError(UserError):
  """A user mistake about the data (path, data set, split, config); one line saying how to fix it.

  A `ValueError` (through `mim_jax.errors.UserError`), so CLIs print it without a trace.
  """


def default_data_config() -> config_dict.ConfigDict:
  """All data-config fields with their defaults; config files start from this.

  Fields:
    kind: 'demo' (embedded photos, no download), 'digits' (scikit-learn's digits,
      upsampled, no download), 'tfds' or 'image_folder'.
    name: TFDS data set name (kind='tfds').
    data_dir: the TFDS data dir (kind='tfds'; None = TFDS's default) or the root of
      <root>/<split>/<class>/<image> (kind='image_folder'), local or on an object
      store (gs://bucket/...); for kind='demo'/'digits' the local cache they are
      built in (None = ~/.cache/mim_jax/tfds).
    split: training split; eval_split: evaluation split (TFDS slicing such as
      'train[:99%]' works for kind='tfds'/'demo').
    image_key, label_key: TFDS feature names of the encoded image and the label.
    crop_scale: RandomResizedCrop area range as a fraction of the image (MAE: (0.2, 1.0)).
    crop_ratio: RandomResizedCrop aspect-ratio range (sampled in log space).
    flip: random horizontal flip with probability 0.5.
      (These three apply to every view of the task's data spec that leaves them None.)
    reduced_jpeg_decode: training decodes a JPEG at 1/2, 1/4 or 1/8 size (libjpeg
      DCT scaling, PIL's `draft`) when its crop still has >= the view's size in pixels
      per side, i.e. only when the crop is shrunk >= 2x (e.g. 64 or 112 px training on
      ImageNet; with several views, the reduction every view allows); faster, same
      crop boxes and flips, but the pixels differ slightly from torchvision's full
      decode + bicubic resize. Off by default, so the inputs match the PyTorch
      reference exactly. Evaluation always decodes in full.
    decoder: training's JPEG decode and crop resize (mim_jax/data/jpeg.py): 'pil'
      keeps torchvision's pixels bit for bit (JPEGs decoded by libjpeg-turbo when
      that is bit-identical); 'turbo' decodes reduced by DCT scaling while the
      crop keeps >= 2x the view's size per side and resizes with OpenCV: same crop
      boxes and flips, ~1.7x the images per core at 224 px, pixels differ by
      ~0.7 grey levels on average (measured, see jpeg.py).
    eval_resize_ratio: evaluation resizes the shorter side to
      int(image_size / eval_resize_ratio) (bicubic), then centre-crops image_size:
      timm's / MAE's `crop_pct` (MAE: 224/256 = 0.875 up to 224 px, 1.0 above).
    digits_size: side (px) the 8x8 digits are upsampled to, bicubic (kind='digits');
      each size is built once as its own TFDS config ('<size>px').
    randaug_magnitude: RandAugment magnitude m in [0, 10] (timm 'rand-m<m>-inc1',
      2 ops of 15 increasing-severity ops, each applied with probability 0.5);
      None = no RandAugment (default; pre-training).
    randaug_mstd: std of the gaussian each op's magnitude is drawn from around m
      (then clipped to [0, 10]); 0 = fixed magnitude; > 100 = uniform in [0, m]
      (timm's 'mstd').
    randaug_num_ops: ops drawn per image, with replacement (timm's 'n').
    color_jitter: brightness, contrast and saturation jitter strength v (factors
      uniform in [max(0, 1 - v), 1 + v], random order: torchvision's
      ColorJitter(v, v, v)); 0 = off. As in timm's create_transform, it is NOT applied
      while RandAugment is on unless force_color_jitter is set.
    force_color_jitter: apply color_jitter after RandAugment too (timm's flag).
      (RandAugment and colour jitter apply to tasks whose data spec sets `augment`.)
    worker_count: grain worker processes per JAX process (0 = in-process).
    prefetch_buffer_size: batches each worker prepares ahead.
    read_threads, read_buffer_size: per-process threads and record buffer that read
      raw records from the source (grain ReadOptions).
  """
  return config_dict.ConfigDict({
      "kind": "demo",
      "name": "imagenet2012",
      "data_dir": config_dict.placeholder(str),
      "split": "train",
      "eval_split": "validation",
      "image_key": "image",
      "label_key": "label",
      "crop_scale": (0.2, 1.0),
      "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
      "flip": True,
      "reduced_jpeg_decode": False,
      "decoder": "pil",
      "eval_resize_ratio": 0.875,
      "digits_size": 64,
      "randaug_magnitude": config_dict.placeholder(float),
      "randaug_mstd": 0.0,
      "randaug_num_ops": 2,
      "color_jitter": 0.0,
      "force_color_jitter": False,
      "worker_count": 2,
      "prefetch_buffer_size": 2,
      "read_threads": 8,
      "read_buffer_size": 128,
  })


def config_value(data_config: Any, key: str) -> Any:
  """`data_config[key]`, or its default when a partial config lacks the field."""
  if key in data_config:
    return data_config[key]
  return default_data_config()[key]
