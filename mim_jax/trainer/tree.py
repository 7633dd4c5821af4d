"""Small pytree helpers shared by the sharding rules, optimiser masks and checkpoints."""

from typing import Any, Callable

import jax


def path_str(path: tuple[Any, ...]) -> str:
  """'encoder/blocks_0/attn/qkv/kernel' for a pytree key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def flatten_with_names(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} for every leaf of `tree`."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def shape_problems(found: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]],
                   *, ignore: Callable[[str], bool] = lambda name: False) -> dict[str, list[str]]:
  """Names missing from `found`, unexpected in it, and shapes that differ ('name got != want').

  Only non-empty kinds are returned; names for which `ignore(name)` holds are skipped.
  """
  problems = {
      "missing": [k for k in wanted if k not in found and not ignore(k)],
      "unexpected": [k for k in found if k not in wanted and not ignore(k)],
      "mismatched": [f"{k} {tuple(found[k])} != {tuple(wanted[k])}" for k in wanted
                     if k in found and tuple(found[k]) != tuple(wanted[k]) and not ignore(k)],
  }
  return {kind: names for kind, names in problems.items() if names}
