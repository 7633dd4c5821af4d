"""The device mesh, parameter placement rules and global batches.

Placement is expressed once, as `RULES`: the first rule whose regex matches a
leaf's path decides it. 'fsdp' shards the leaf's largest dimension divisible by
the fsdp axis (only for leaves of at least `fsdp_min_size` elements; smaller ones
are replicated); 'replicate' copies it to every device. Batches are split over
both mesh axes. `make_mesh` lays the devices out by the TPU topology (one slice)
or by slice (multislice).
"""

import collections
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mim_jax.errors import ConfigError
from mim_jax.trainer.tree import path_str

DATA_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(kernel|embedding)$", "fsdp"),
    (r".*", "replicate"),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None, *,
              dcn_data: int = -1) -> Mesh:
  """A ('data', 'fsdp') mesh with Auto axes; -1 in one axis takes the remaining devices.

  `data` and `fsdp` are the axes' global sizes (their product is the device
  count, whatever the topology). On one slice the devices are laid out by
  `mesh_utils.create_device_mesh`, so that on a TPU each 'fsdp' group (the
  axis that communicates every layer) sits on neighbouring chips of the ICI
  torus (a layout it cannot make, e.g. on part of a torus, falls back to the
  devices' order with a warning). On several TPU slices (multislice: devices
  with different `slice_index`)
  the 'data' axis spans `dcn_data` slices (-1: all of them), so only the
  once-a-step gradient reduction crosses the slow data-centre network; the
  remaining slices, if any, extend 'fsdp'.
  """
  return Mesh(device_grid(data, fsdp, devices, dcn_data=dcn_data), DATA_AXES,
              axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """`make_mesh` with a config's `mesh` group (data, fsdp, dcn_data)."""
  return make_mesh(mesh_config.data, mesh_config.fsdp, devices,
                   dcn_data=mesh_config.get("dcn_data", -1))


def device_grid(data: int, fsdp: int, devices: Sequence[Any] | None = None, *,
                dcn_data: int = -1) -> np.ndarray:
  """The (data, fsdp) array of devices `make_mesh` uses (device-like objects work too)."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = _axis_sizes(data, fsdp, len(devices))
  slices = _slice_count(devices)
  if slices == 1:
    if dcn_data not in (-1, 1):
      raise ConfigError(f"mesh.dcn_data={dcn_data} but the {len(devices)} devices form one "
                        f"slice; leave mesh.dcn_data at -1 (or 1)")
    try:
      return mesh_utils.create_device_mesh((data, fsdp), devices,
                                           allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError) as error:  # e.g. a partial torus
      logging.warning("mesh: no topology-aware layout of data=%d x fsdp=%d on these devices "
                      "(%s); using their order", data, fsdp, str(error).splitlines()[0][:200])
      return np.asarray(devices).reshape(data, fsdp)
  dcn_data = slices if dcn_data == -1 else dcn_data
  if dcn_data < 1 or slices % dcn_data:
    raise ConfigError(f"mesh.dcn_data={dcn_data} must divide the {slices} slices; use -1 "
                      f"(the data axis spans all slices) or a divisor of {slices}")
  dcn_fsdp = slices // dcn_data
  if data % dcn_data or fsdp % dcn_fsdp:
    raise ConfigError(f"mesh: data={data} x fsdp={fsdp} cannot span {slices} slices as "
                      f"{dcn_data} (data) x {dcn_fsdp} (fsdp); make mesh.data a multiple of "
                      f"{dcn_data} and mesh.fsdp a multiple of {dcn_fsdp}")
  return mesh_utils.create_hybrid_device_mesh(
      (data // dcn_data, fsdp // dcn_fsdp), (dcn_data, dcn_fsdp), devices,
      allow_split_physical_axes=True)


def _axis_sizes(data: int, fsdp: int, count: int) -> tuple[int, int]:
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
  return data, fsdp


def _slice_count(devices: Sequence[Any]) -> int:
  """How many TPU slices the devices span (1 off TPU, where `slice_index` means other things)."""
  indices = {getattr(d, "slice_index", None) for d in devices}
  if devices[0].platform != "tpu" or None in indices:
    return 1
  per_slice = collections.Counter(d.slice_index for d in devices)
  if len(set(per_slice.values())) > 1:
    counts = ", ".join(f"slice {s}: {n}" for s, n in sorted(per_slice.items()))
    raise ConfigError(f"the slices hold different numbers of devices ({counts}); use slices "
                      f"of one accelerator type and size")
  return len(indices)


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
