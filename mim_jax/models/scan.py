"""Stacked (scanned) vs per-block params: one stable layout outside the model.

Params live everywhere outside `Module.apply` in the per-block layout
(`blocks_{i}/...`): the train state, optimizer state, checkpoints, converted
files, teachers, fine-tuning inits. A model with `scan_blocks=True` wants blocks
1..depth stacked under `vit.SCANNED_BLOCKS` (leading axis = depth); the tasks
convert at `apply` with `apply_layout`, inside the jitted step, so the stack is
part of the step and its transpose (a slice per block) brings the gradients back
in the per-block layout.

Why not keep the train state stacked (and convert in the checkpointer): the
optimizer's per-leaf rules would change meaning on stacked leaves (LARS's trust
ratio and the fine-tuning weight-decay rule read a leaf's norm and rank,
layer-wise lr decay reads `blocks_{i}`), and so would the FSDP placement; the
per-step stack is one copy of the block params, small next to the activations.
Init goes through the unscanned twin (`unscanned`), so a seed gives the same
weights with or without scan.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models.mae import MaskedAutoencoder
from mim_jax.models.vit import SCANNED_BLOCKS, VisionTransformer

Params = dict[str, Any]


def _stack(*leaves: Any) -> Any:
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_blocks(params: Params, depth: int) -> Params:
  """Encoder params with `blocks_0..blocks_{depth-1}` -> the same with those blocks stacked
  under `SCANNED_BLOCKS`. Other entries (D²-MAE's `blocks_{depth}`) are kept as they are."""
  names = [f"blocks_{i}" for i in range(depth)]
  missing = [name for name in names if name not in params]
  if SCANNED_BLOCKS in params or missing:
    raise ValueError(f"cannot stack {depth} blocks: "
                     + (f"{SCANNED_BLOCKS!r} is already there" if SCANNED_BLOCKS in params
                        else f"missing {missing}"))
  blocks = [params[name] for name in names]
  structure = jax.tree.structure(blocks[0])
  for name, block in zip(names, blocks):
    if jax.tree.structure(block) != structure:
      raise ValueError(f"{name} has other leaves than blocks_0; cannot stack")
  out = {k: v for k, v in params.items() if k not in names}
  out[SCANNED_BLOCKS] = jax.tree.map(_stack, *blocks)
  return out


def unstack_blocks(params: Params, depth: int) -> Params:
  """Inverse of `stack_blocks` (exact: slices of the stacked arrays)."""
  if SCANNED_BLOCKS not in params:
    raise ValueError(f"no {SCANNED_BLOCKS!r} to unstack (entries: {sorted(params)})")
  stacked = params[SCANNED_BLOCKS]
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
  if sizes != {depth}:
    raise ValueError(f"stacked blocks have leading sizes {sorted(map(str, sizes))}, "
                     f"not the depth {depth}")
  clash = [f"blocks_{i}" for i in range(depth) if f"blocks_{i}" in params]
  if clash:
    raise ValueError(f"both {SCANNED_BLOCKS!r} and {clash} are present")
  out = {k: v for k, v in params.items() if k != SCANNED_BLOCKS}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return out


def apply_layout(params: Params, model: Any) -> Params:
  """Per-block params -> what `model.apply` wants (stacked iff the model scans).

  `model`: a `VisionTransformer` (encoder params) or a `MaskedAutoencoder` (params with
  an 'encoder' entry; other entries pass through)."""
  if isinstance(model, MaskedAutoencoder):
    return {**params, "encoder": apply_layout(params["encoder"], model.encoder)}
  if isinstance(model, VisionTransformer):
    return stack_blocks(params, model.depth) if model.scan_blocks else params
  raise TypeError(f"no block layout known for {type(model).__name__}")


def stored_layout(params: Params, model: Any) -> Params:
  """Inverse of `apply_layout`: the model's params -> per-block (`blocks_{i}`)."""
  if isinstance(model, MaskedAutoencoder):
    return {**params, "encoder": stored_layout(params["encoder"], model.encoder)}
  if isinstance(model, VisionTransformer):
    return unstack_blocks(params, model.depth) if model.scan_blocks else params
  raise TypeError(f"no block layout known for {type(model).__name__}")


def unscanned(model: Any) -> Any:
  """The same model with `scan_blocks=False`: its `init` gives the stored layout."""
  if isinstance(model, MaskedAutoencoder):
    return model.clone(encoder=unscanned(model.encoder))
  if isinstance(model, VisionTransformer):
    return model.clone(scan_blocks=False)
  raise TypeError(f"no block layout known for {type(model).__name__}")
