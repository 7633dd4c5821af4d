"""Pre-trained encoder weights into a freshly initialised (fine-tuning) encoder.

The source is anything `converted.load_converted` reads: a mim_jax pre-training
workdir, a converted PyTorch checkpoint, a fine-tuned model. What is loaded,
what stays freshly initialised and what is dropped is reported leaf by leaf, so
the training log can say exactly where every weight came from. Rules (MAE's
fine-tuning load, made strict):

* every leaf of the new encoder is loaded from the source with the same path and
  shape, except
* `head` and `fc_norm` (and `head` of another number of classes), which stay fresh;
* `pos_embed`: taken from the source's learned table, or from the sin-cos table
  the source was pre-trained with, resized bicubically (PyTorch's kernel, as MAE's
  `interpolate_pos_embed`) when the patch grid differs; relative position bias tables
  as timm / BEiT resize them (`resize_relative_position_bias`);
* blocks at and after `keep_blocks` stay fresh (the layer-reservation experiment);
* leaves a fine-tuning architecture adds to the pre-trained encoder stay fresh when
  the source lacks them, as MAE-Lite's non-strict load leaves them at their init:
  relative position bias tables (zeros: `rel_pos_bias='per_block'` / 'shared',
  MAE-Lite's RPE fine-tuning) and separate q / v biases (`qkv_bias='qv'`, zeros: the
  source's fused qkv bias has another name and is dropped). A fused qkv bias is
  built from a source's q / v biases as [q, 0, v], the same function;
* the source's decoder, distillation mappings, D²-MAE extra block and a final
  `norm` the new (global-pool) model lacks are dropped;
* anything else the new encoder has that the source lacks, or has with another
  shape, is an error that lists the leaves.
"""

import dataclasses
from typing import Any

import numpy as np
from absl import logging

from mim_jax.convert.converted import Converted, unflatten
from mim_jax.errors import CheckpointMismatchError
from mim_jax.models import posembed
from mim_jax.trainer.tree import flatten_with_names

ALWAYS_FRESH = ("head/", "fc_norm/")
# Leaf names (last path part) a fine-tuning architecture may add, fresh when the source
# lacks them, and why.
ADDED_LEAVES = {
    "relative_position_bias_table": "new: relative position bias, starts at 0",
    "q_bias": "new: q bias, starts at 0 as MAE-Lite's load leaves it",
    "v_bias": "new: v bias, starts at 0 as MAE-Lite's load leaves it",
}


@dataclasses.dataclass
class InitReport:
  """Where each leaf of the new encoder came from (names relative to the encoder)."""
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  resized: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)

  def log(self) -> None:
    logging.info("Initialised from %s: %d leaves loaded, %d fresh, %d source leaves unused",
                 self.source, len(self.loaded), len(self.fresh), len(self.dropped))
    for kind in ("resized", "fresh", "dropped"):
      for name in getattr(self, kind):
        logging.info("  %s: %s", kind, name)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's bicubic convolution weights for offsets t in [0, 1): 4 taps."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(values: np.ndarray, new_size: int, axis: int) -> np.ndarray:
  """Bicubic resize along one axis, align_corners=False, borders clamped (torch)."""
  old_size = values.shape[axis]
  scale = old_size / new_size
  source = (np.arange(new_size) + 0.5) * scale - 0.5
  base = np.floor(source).astype(int)
  weights = _cubic_weights(source - base)  # (new, 4)
  taps = np.clip(base[:, None] + np.arange(-1, 3)[None], 0, old_size - 1)  # (new, 4)
  moved = np.moveaxis(values, axis, 0)
  out = np.einsum("nk,nk...->n...", weights, moved[taps])
  return np.moveaxis(out, 0, axis)


def resize_position_embedding(table: np.ndarray, new_grid: int) -> np.ndarray:
  """(1, 1 + g*g, d) -> (1, 1 + new_grid**2, d): the cls slot kept, the grid resized."""
  cls, grid_part = table[:, :1], table[:, 1:]
  old_grid = int(round(grid_part.shape[1]**0.5))
  if old_grid * old_grid != grid_part.shape[1]:
    raise CheckpointMismatchError(f"position embedding of {grid_part.shape[1]} patches is not "
                                  f"a square grid")
  if old_grid == new_grid:
    return table
  grid = grid_part.reshape(old_grid, old_grid, -1).astype(np.float64)
  grid = _resize_axis(_resize_axis(grid, new_grid, 0), new_grid, 1)
  grid = grid.reshape(1, new_grid * new_grid, -1).astype(table.dtype)
  return np.concatenate([cls, grid], axis=1)


REL_POS_TABLE = "relative_position_bias_table"
REL_POS_EXTRA = 3  # cls->token, token->cls, cls->cls (BEiT's layout: after the grid's offsets)


def _geometric_offsets(source_side: int, target_side: int) -> np.ndarray:
  """Where BEiT puts a (source_side,) table's offsets on the target's axis: the central
  ones at unit steps, the outer ones spread by a geometric progression whose ratio is
  found by bisection (timm's `resize_rel_pos_bias_table`, after BEiT's fine-tuning)."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    ratio = (left + right) / 2.0
    if (1.0 - ratio**(source_side // 2)) / (1.0 - ratio) > target_side // 2:
      right = ratio
    else:
      left = ratio
  distances, current = [], 1.0
  for i in range(source_side // 2):
    distances.append(current)
    current += ratio**(i + 1)
  return np.array([-d for d in reversed(distances)] + [0.0] + distances)


def _linear_weights(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """(targets, points) weights of linear interpolation on an uneven grid, ends clamped
  (timm's `RegularGridInterpolator`, one axis)."""
  right = np.minimum(np.searchsorted(points, targets, side="left"), len(points) - 1)
  left = np.clip(right - 1, 0, len(points) - 1)
  to_left = np.maximum(targets - points[left], 0.0)
  to_right = np.maximum(points[right] - targets, 0.0)
  both_zero = (to_left == 0) & (to_right == 0)
  to_left[both_zero] = to_right[both_zero] = 1.0
  weights = np.zeros((len(targets), len(points)))
  rows = np.arange(len(targets))
  np.add.at(weights, (rows, left), to_right / (to_left + to_right))
  np.add.at(weights, (rows, right), to_left / (to_left + to_right))
  return weights


def resize_relative_position_bias(table: np.ndarray, new_grid: int) -> np.ndarray:
  """((2g-1)**2 + 3, heads) -> ((2n-1)**2 + 3, heads) for a patch grid of side n.

  As timm's `resize_rel_pos_bias_table` (BEiT / SimMIM checkpoints at another
  resolution): the source offsets are placed on the target axis by BEiT's geometric
  progression and interpolated linearly per head; the three cls entries are kept.
  """
  offsets, extra = table[:-REL_POS_EXTRA], table[-REL_POS_EXTRA:]
  old_side = int(round(offsets.shape[0]**0.5))
  if old_side * old_side != offsets.shape[0] or old_side % 2 == 0:
    raise CheckpointMismatchError(f"relative position bias table of {table.shape[0]} rows is "
                                  f"not (2g-1)**2 + 3")
  new_side = 2 * new_grid - 1
  if old_side == new_side:
    return table
  weights = _linear_weights(_geometric_offsets(old_side, new_side),
                            np.arange(-(new_side // 2), new_side // 2 + 0.1, 1.0))
  grid = offsets.reshape(old_side, old_side, -1).astype(np.float64)
  grid = np.einsum("yi,xj,ijh->yxh", weights, weights, grid)
  return np.concatenate([grid.reshape(new_side * new_side, -1).astype(table.dtype), extra])


def grid_of_table(table_shape: tuple[int, ...]) -> int:
  """The patch grid side g of a ((2g-1)**2 + 3, heads) relative position bias table."""
  return (int(round((table_shape[0] - REL_POS_EXTRA)**0.5)) + 1) // 2


def source_position_embedding(source: Converted) -> np.ndarray:
  """The source's (1, 1 + L, d) table: learned, or the sin-cos it was trained with."""
  encoder = source.params["encoder"]
  if "pos_embed" in encoder:
    return np.asarray(encoder["pos_embed"])
  grid = source.arch["image_size"] // source.arch["patch_size"]
  return posembed.sincos_2d(source.arch["width"], grid, cls_token=True)[None]


def init_encoder_from(fresh: dict[str, Any], source: Converted, *,
                      keep_blocks: int | None = None) -> tuple[dict[str, Any], InitReport]:
  """Returns (encoder params, report): `fresh` with the source's weights put in.

  Args:
    fresh: the new encoder's freshly initialised params (numpy or jax arrays).
    source: pre-trained weights (`converted.load_converted`).
    keep_blocks: load only blocks 1..keep_blocks; later ones stay fresh. None = all.
  """
  report = InitReport(source=source.path)
  arch = source.arch
  wanted = flatten_with_names(fresh)
  given = flatten_with_names(source.params["encoder"])
  if arch["extra_attention_block"]:
    given = {k: v for k, v in given.items() if not k.startswith(f"blocks_{arch['depth']}/")}
  report.dropped += [f"{part} (all leaves)" for part in sorted(source.params) if part != "encoder"]
  if arch["extra_attention_block"]:
    report.dropped.append(f"blocks_{arch['depth']} (D²-MAE's attention-only block)")

  def reserved(name: str) -> bool:
    if keep_blocks is None or not name.startswith("blocks_"):
      return False
    return int(name.split("/")[0].split("_")[1]) >= keep_blocks

  out, problems = {}, []
  merged: set[str] = set()  # source leaves put into a leaf of another name
  for name, value in wanted.items():
    if name.startswith(ALWAYS_FRESH) and not (
        name.startswith("head/") and name in given and given[name].shape == value.shape):
      out[name] = value
      report.fresh.append(name)
    elif reserved(name):
      out[name] = value
      report.fresh.append(f"{name} (re-initialised: keep_blocks={keep_blocks})")
    elif name == "pos_embed":
      table = source_position_embedding(source)
      new_grid = int(round((value.shape[1] - 1)**0.5))
      resized = resize_position_embedding(table, new_grid)
      if resized.shape != value.shape:
        problems.append(f"pos_embed: source {table.shape} cannot become {value.shape}")
        continue
      out[name] = resized.astype(value.dtype)
      report.loaded.append(name)
      if table.shape != value.shape:
        report.resized.append(f"pos_embed {table.shape} -> {value.shape} (bicubic)")
    elif (name.endswith(REL_POS_TABLE) and name in given
          and tuple(given[name].shape) != tuple(value.shape)):
      table = np.asarray(given[name])
      out[name] = resize_relative_position_bias(table, grid_of_table(value.shape)
                                                ).astype(value.dtype)
      report.loaded.append(name)
      report.resized.append(f"{name} {table.shape} -> {value.shape} (BEiT's geometric "
                            f"interpolation)")
    elif name not in given and name.rsplit("/", 1)[-1] in ADDED_LEAVES:
      out[name] = value
      report.fresh.append(f"{name} ({ADDED_LEAVES[name.rsplit('/', 1)[-1]]})")
    elif name not in given and name.endswith("/attn/qkv/bias") and _qv_biases(given, name):
      q_bias, v_bias = _qv_biases(given, name)
      out[name] = np.concatenate([q_bias, np.zeros_like(q_bias), v_bias]).astype(value.dtype)
      merged.update(f"{name[:-len('qkv/bias')]}{part}" for part in ("q_bias", "v_bias"))
      report.loaded.append(f"{name} (from the source's q_bias, v_bias: [q, 0, v])")
    elif name not in given:
      problems.append(f"{name}: missing from the source")
    elif tuple(given[name].shape) != tuple(value.shape):
      problems.append(f"{name}: source {tuple(given[name].shape)} vs model {tuple(value.shape)}")
    else:
      out[name] = np.asarray(given[name]).astype(value.dtype)
      report.loaded.append(name)
  report.dropped += sorted(name for name in given if name not in wanted and name not in merged)
  if problems:
    shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)"
                                        if len(problems) > 10 else "")
    raise CheckpointMismatchError(
        f"the weights in {source.path} do not fit this encoder ({len(problems)} leaves: "
        f"{shown}); check model.variant/width/depth/num_heads/patch_size against the source "
        f"({arch['width']} wide, {arch['depth']} blocks, patch {arch['patch_size']})")
  return unflatten(out), report


def _qv_biases(given: dict[str, Any], qkv_bias: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The source's q_bias and v_bias beside a wanted `.../attn/qkv/bias`, or None."""
  attention = qkv_bias[:-len("qkv/bias")]
  q_bias, v_bias = given.get(f"{attention}q_bias"), given.get(f"{attention}v_bias")
  if q_bias is None or v_bias is None:
    return None
  return np.asarray(q_bias), np.asarray(v_bias)
