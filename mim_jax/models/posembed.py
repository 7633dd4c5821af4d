"""Fixed 2-D sin-cos position embeddings (MAE's construction, as constants)."""

import numpy as np


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, embed_dim): [sin(p * w), cos(p * w)], w = 10000^(-2i/D)."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
  """(grid_size**2 [+1], embed_dim) float32 table in raster order.

  As in the MAE reference, the first half of the channels encodes the column
  index and the second half the row index; the cls slot (if any) is zeros.
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
  cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                           np.arange(grid_size, dtype=np.float32))
  table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)],
                         axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
  return table.astype(np.float32)
