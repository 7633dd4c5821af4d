"""What a task asks of the input pipeline: the data spec.

A task (pre-training method, fine-tuning, probing) describes the training batch
it needs; the loader builds exactly that and knows no method:

  * `views`: one or more crops of every image, each with its own size and
    RandomResizedCrop / flip settings (MAE, SimMIM, MaskFeat: one view;
    MoCo-v3: two; DINO: two global and several local ones). View k's pixels are
    batch[view.key] (uint8, (B, size, size, 3)).
  * `worker_fields`: per-image arrays made in the grain workers from the
    record's own random stream (so they resume exactly), e.g. BEiT / MaskFeat
    block-wise masks or the box of a random erasing. Each is a picklable
    `WorkerField`: `name` is its batch key, `make(rng)` returns one example's array.
  * `labels`: batch['label'] (int32 class indices) is needed.
  * `augment`: the fine-tuning augmentations of the data config (RandAugment,
    colour jitter) apply to the views.

Data-config values (`data.crop_scale`, `data.flip`, ...) fill every view field
left as None, so a one-view task says only its image size.

`pipeline.make_train_loader(data_config, spec, ...)` builds it: each record is
decoded once, and its generator draws every view's box and flip (view order),
then the augmentations, then each worker field's `make` (field order); see
`views.py`. Batches are reproducible per seed, resume exactly, and do not
depend on the process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


class WorkerField(Protocol):
  """A per-example array made in a grain worker from the example's random generator."""

  name: str  # the batch key

  def make(self, rng: np.random.Generator) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One random crop of each image.

  Attributes:
    size: side of the square crop in pixels.
    key: batch key of this view's uint8 pixels.
    crop_scale: RandomResizedCrop area range; None = data.crop_scale.
    crop_ratio: aspect-ratio range; None = data.crop_ratio.
    flip: random horizontal flip; None = data.flip.
  """
  size: int
  key: str = "image"
  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] | None = None
  flip: bool | None = None


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The training batch a task needs (see the module docstring)."""
  views: tuple[ViewSpec, ...]
  labels: bool = False
  augment: bool = False
  worker_fields: tuple[Any, ...] = ()  # WorkerField instances

  def __post_init__(self):
    for field in self.worker_fields:
      if not isinstance(getattr(field, "name", None), str) or not callable(
          getattr(field, "make", None)):
        raise TypeError(f"worker field {field!r} needs a str `name` and a `make(rng)` method")
    keys = [view.key for view in self.views] + [field.name for field in self.worker_fields]
    if not self.views:
      raise ValueError("a data spec needs at least one view")
    if len(set(keys)) != len(keys) or "label" in keys:
      raise ValueError(f"batch keys must be distinct and not 'label': {keys}")

  @classmethod
  def single_view(cls, size: int, **kwargs: Any) -> "DataSpec":
    """One view under 'image' (MAE, SimMIM, fine-tuning)."""
    return cls(views=(ViewSpec(size),), **kwargs)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return (tuple(view.key for view in self.views) + tuple(f.name for f in self.worker_fields)
            + (("label",) if self.labels else ()))
