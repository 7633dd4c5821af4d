"""PNG grids of images (rows = examples, columns = named views)."""

import os

import numpy as np


def save_image_grid(columns: dict[str, np.ndarray], path: str, title: str = "") -> str:
  """columns: name -> (B, H, W, 3) floats in [0, 1]; writes a B x len(columns) PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(columns)
  rows = len(columns[names[0]])
  fig, axes = plt.subplots(rows, len(names), figsize=(2.0 * len(names), 2.0 * rows),
                           squeeze=False)
  for r in range(rows):
    for c, name in enumerate(names):
      axes[r, c].imshow(np.clip(np.asarray(columns[name][r], np.float32), 0.0, 1.0))
      axes[r, c].set_xticks([])
      axes[r, c].set_yticks([])
      if r == 0:
        axes[r, c].set_title(name)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
