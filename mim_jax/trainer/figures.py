"""PNG grids of images (rows = examples, columns = named views)."""

import io as bytes_io
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mim_jax import io


def image_grid(columns: Mapping[str, np.ndarray], title: str = "") -> Figure:
  """columns: name -> (B, H, W, 3) floats in [0, 1]; a B x len(columns) grid of images.

  Built with matplotlib's object API, not pyplot: no global backend switch, so the
  inline plots of a notebook that trains keep working.
  """
  names = list(columns)
  rows = len(columns[names[0]])
  fig = Figure(figsize=(2.0 * len(names), 2.0 * rows + (0.4 if title else 0.0)),
               layout="constrained")
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
  return fig


def save_image_grid(columns: Mapping[str, np.ndarray], path: str, title: str = "") -> str:
  """Writes `image_grid(columns, title)` as a PNG (local or gs://); returns the path."""
  save_figure(image_grid(columns, title), path, dpi=80)
  return path


def save_figure(fig: Figure, path: str, dpi: int) -> None:
  """Renders `fig` as a PNG in memory and writes the bytes to `path` (local or gs://)."""
  buffer = bytes_io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  io.write_bytes(path, buffer.getvalue())
