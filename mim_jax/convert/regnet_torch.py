"""timm RegNet state_dicts <-> mim_jax `RegNet` variables, in pure numpy.

No torch here (`torch_io` reads the files; DeiT's `regnety_160-a5fe301d.pth`
keeps the state_dict under 'model', which its reader unwraps). As in
`torch_format`, one table of entries, built from the architecture, drives both
directions; import insists that the state_dict matches it exactly and reports
every missing key, unexpected key and shape mismatch in one `UserError`.

Layouts: a convolution weight (out, in / groups, kh, kw) <-> kernel (kh, kw,
in / groups, out); the head's Linear weight (classes, width) <-> kernel.T.
BatchNorm `weight` / `bias` are params `scale` / `bias`; `running_mean` /
`running_var` are `batch_stats` `mean` / `var`. BatchNorm's
`num_batches_tracked` is a training counter that eval mode never reads: import
accepts it and drops it (it need not be there); export writes it as 0 so that
the key set is timm's own.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mim_jax.convert.torch_format import Entry, listing
from mim_jax.errors import UserError
from mim_jax.models.regnet import RegNetConfig, get_config, stage_specs
from mim_jax.trainer.tree import shape_problems

BN_COUNTER = "num_batches_tracked"
COLLECTIONS = ("params", "batch_stats")

_TO_JAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda x: x, "linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0)}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda x: x, "linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1)}


def _conv(key: str, path: tuple[str, ...], out: int, per_group_in: int, kernel: int,
          bias: bool = False) -> list[Entry]:
  entries = [Entry(f"{key}.weight", ("params",) + path + ("kernel",),
                   (out, per_group_in, kernel, kernel), "conv")]
  if bias:
    entries.append(Entry(f"{key}.bias", ("params",) + path + ("bias",), (out,)))
  return entries


def _conv_bn(key: str, path: tuple[str, ...], out: int, per_group_in: int,
             kernel: int) -> list[Entry]:
  """timm's ConvNormAct: `{key}.conv` and `{key}.bn` (the counter is handled apart)."""
  bn, bn_path = f"{key}.bn", path + ("bn",)
  return _conv(f"{key}.conv", path + ("conv",), out, per_group_in, kernel) + [
      Entry(f"{bn}.weight", ("params",) + bn_path + ("scale",), (out,)),
      Entry(f"{bn}.bias", ("params",) + bn_path + ("bias",), (out,)),
      Entry(f"{bn}.running_mean", ("batch_stats",) + bn_path + ("mean",), (out,)),
      Entry(f"{bn}.running_var", ("batch_stats",) + bn_path + ("var",), (out,)),
  ]


def entries(arch: str | RegNetConfig, num_classes: int = 1000) -> list[Entry]:
  """Every tensor of timm's RegNet `arch` (but BatchNorm counters), in timm's order."""
  config = get_config(arch)
  table = _conv_bn("stem", ("stem",), config.stem_width, 3, 3)
  in_width = config.stem_width
  for i, spec in enumerate(stage_specs(config)):
    for j in range(spec.depth):
      key, path = f"s{i + 1}.b{j + 1}", (f"s{i + 1}", f"b{j + 1}")
      bottleneck = int(round(spec.width * spec.bottle_ratio))
      table += _conv_bn(f"{key}.conv1", path + ("conv1",), bottleneck, in_width, 1)
      table += _conv_bn(f"{key}.conv2", path + ("conv2",), bottleneck, spec.group_size, 3)
      if config.se_ratio:
        reduced = int(round(in_width * config.se_ratio))
        table += _conv(f"{key}.se.fc1", path + ("se", "fc1"), reduced, bottleneck, 1, bias=True)
        table += _conv(f"{key}.se.fc2", path + ("se", "fc2"), bottleneck, reduced, 1, bias=True)
      table += _conv_bn(f"{key}.conv3", path + ("conv3",), spec.width, bottleneck, 1)
      if j == 0:  # stride 2: timm's conv1x1 shortcut
        table += _conv_bn(f"{key}.downsample", path + ("downsample",), spec.width, in_width, 1)
      in_width = spec.width
  table += [Entry("head.fc.weight", ("params", "head", "fc", "kernel"), (num_classes, in_width),
                  "linear"),
            Entry("head.fc.bias", ("params", "head", "fc", "bias"), (num_classes,))]
  return table


def _describe(arch: str | RegNetConfig, num_classes: int) -> str:
  name = arch if isinstance(arch, str) else repr(arch)
  return f"timm {name} with {num_classes} classes"


def _where(source: str) -> str:
  return f"{source}: " if source else ""


def _report(problems: dict[str, list[str]], what: str) -> str:
  names = {"missing": f"missing {what}", "unexpected": f"unexpected {what}",
           "mismatched": "shape mismatches (got != expected)"}
  return "; ".join(f"{names[kind]}: {listing(found)}" for kind, found in problems.items())


def params_from_timm_state_dict(state_dict: dict[str, Any], arch: str | RegNetConfig, *,
                                num_classes: int = 1000,
                                source: str = "") -> dict[str, dict[str, Any]]:
  """A timm RegNet state_dict -> {'params': ..., 'batch_stats': ...} for `RegNet`.

  Args:
    state_dict: torch key -> array (numpy, or anything `np.asarray` takes).
    arch: the timm model name ('regnety_160') or a `RegNetConfig`.
    num_classes: classes of the head (1000 for ImageNet-1k weights).
    source: where the weights came from, for the error message.

  Raises:
    UserError: any missing or unexpected key or shape mismatch, all listed in one line.
  """
  table = entries(arch, num_classes)
  counters = {e.key.replace(".running_mean", f".{BN_COUNTER}")
              for e in table if e.key.endswith(".running_mean")}
  found = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k not in counters}
  problems = shape_problems(found, {e.key: e.shape for e in table})
  if problems:
    raise UserError(f"{_where(source)}the state_dict is not {_describe(arch, num_classes)}: "
                    f"{_report(problems, 'keys')} (is the architecture or num_classes "
                    f"wrong?)")
  variables: dict[str, Any] = {name: {} for name in COLLECTIONS}
  for entry in table:
    value = np.asarray(state_dict[entry.key], dtype=np.float32)
    node = variables
    for part in entry.path[:-1]:
      node = node.setdefault(part, {})
    node[entry.path[-1]] = np.ascontiguousarray(_TO_JAX[entry.kind](value))
  return variables


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return {prefix: tree}
  return {path: leaf for key, value in tree.items()
          for path, leaf in _leaves(value, prefix + (str(key),)).items()}


def timm_state_dict_from_params(variables: dict[str, Any], arch: str | RegNetConfig, *,
                                num_classes: int = 1000) -> dict[str, np.ndarray]:
  """`RegNet` variables -> timm's state_dict (float32; BatchNorm counters 0 as int64).

  Raises:
    UserError: the variables do not have exactly the architecture's leaves and shapes.
  """
  table = entries(arch, num_classes)
  leaves = _leaves({name: variables.get(name, {}) for name in COLLECTIONS})
  problems = shape_problems({"/".join(p): tuple(np.shape(v)) for p, v in leaves.items()},
                            {"/".join(e.path): e.jax_shape for e in table})
  if problems:
    raise UserError(f"the variables are not {_describe(arch, num_classes)}: "
                    f"{_report(problems, 'variables')}")
  state_dict: dict[str, np.ndarray] = {}
  for entry in table:
    value = np.asarray(leaves[entry.path], dtype=np.float32)
    state_dict[entry.key] = np.ascontiguousarray(_TO_TORCH[entry.kind](value))
    if entry.key.endswith(".running_var"):
      state_dict[entry.key.replace(".running_var", f".{BN_COUNTER}")] = np.zeros((), np.int64)
  return state_dict
