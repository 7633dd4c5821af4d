"""Small pytree helpers shared by the sharding rules, optimiser masks and checkpoints."""

from typing import Any

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
