"""The device mesh, parameter placement rules and global batches.

Placement is expressed once, as `RULES`: the first rule whose regex matches a
leaf's path decides it. 'fsdp' shards the leaf's largest dimension divisible by
the fsdp axis (only for leaves of at least `fsdp_min_size` elements; smaller ones
are replicated); 'replicate' copies it to every device. Batches are split over
both mesh axes.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mim_jax.errors import ConfigError
from mim_jax.trainer.tree import path_str

DATA_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(kernel|embedding)$", "fsdp"),
    (r".*", "replicate"),
)


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh with Auto axes; -1 in one axis takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = count // max(fsdp, 1)
  if fsdp == -1:
    fsdp = count // max(data, 1)
  if data < 1 or fsdp < 1 or data * fsdp != count:
    raise ConfigError(f"mesh: data={data} x fsdp={fsdp} does not use the {count} devices "
                      f"available; set --config.mesh.data/--config.mesh.fsdp so their product "
                      f"is {count}")
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def leaf_spec(name: str, shape: Sequence[int], fsdp_size: int,
              rules: Sequence[tuple[str, str]] = RULES, fsdp_min_size: int = 2**14) -> P:
  """PartitionSpec of one leaf by the first matching rule."""
  for pattern, placement in rules:
    if re.search(pattern, name):
      break
  else:
    placement = "replicate"
  if placement == "replicate" or fsdp_size == 1 or int(np.prod(shape)) < fsdp_min_size:
    return P()
  if placement != "fsdp":
    raise ValueError(f"unknown placement {placement!r} for {name}")
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[int(candidates[0])] = "fsdp"
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = RULES,
                   fsdp_min_size: int = 2**14) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by `rules`."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(
          mesh, leaf_spec(path_str(path), np.shape(leaf), fsdp_size, rules, fsdp_min_size)),
      tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  processes = jax.process_count()
  if global_batch_size % processes:  # first: the mesh's size is a multiple of it
    raise ConfigError(f"batch_size {global_batch_size} is not divisible by the {processes} "
                      f"processes; use a multiple of {mesh.size} (the devices of all of them)")
  if global_batch_size % mesh.size:
    raise ConfigError(f"batch_size {global_batch_size} is not divisible by the {mesh.size} "
                      f"devices of the mesh; use a multiple of {mesh.size}")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of the batch into global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
