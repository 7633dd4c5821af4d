"""PNG grids of images (rows = examples, columns = named views)."""

import os

import numpy as np


def save_image_grid(columns: dict[str, np.ndarray], path: str, title: str = "") -> str:
  """columns: name -> (B, H, W, 3) floats in [0, 1]; writes a B x len(columns) PNG.

  Built with matplotlib's object API, not pyplot: no global backend switch, so the
  inline plots of a notebook that trains keep working.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = list(columns)
  rows = len(columns[names[0]])
  fig = Figure(figsize=(2.0 * len(names), 2.0 * rows))
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, len(names), squeeze=False)
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
  return path
