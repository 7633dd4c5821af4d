"""Figures of the analyses; each returns a matplotlib Figure and writes a PNG when given a path.

    plot_cka(result.matrix, name_a="MAE", name_b="D²-MAE", path="cka.png")
    plot_attention_boxes({"MAE": stats.distance}, ylabel="attention distance (px)")
    plot_attention_maps(image, maps[0], query_token=27, grid=8, patch_size=8)
    plot_reconstructions(views)

Figures are built with matplotlib's object API, never pyplot, so they change no global
backend or state: a notebook shows the returned Figure inline, a script saves it.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure

from mim_jax.trainer import figures

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _save(fig: Figure, path: str | None) -> Figure:
  if path:
    figures.save_figure(fig, path, dpi=100)
  return fig


def plot_cka(matrix: np.ndarray, *, name_a: str, name_b: str,
             layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None,
             path: str | None = None, title: str = "") -> Figure:
  """Heatmap of a (La, Lb) CKA matrix: model A's layers up, model B's across."""
  matrix = np.asarray(matrix)
  layers_a = list(range(matrix.shape[0])) if layers_a is None else list(layers_a)
  layers_b = list(range(matrix.shape[1])) if layers_b is None else list(layers_b)
  fig = Figure(figsize=(1.6 + 0.32 * len(layers_b), 1.0 + 0.32 * len(layers_a)),
               layout="constrained")
  ax = fig.add_subplot()
  image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0,
                    interpolation="nearest")
  ax.set_xticks(range(len(layers_b)), [str(layer) for layer in layers_b])
  ax.set_yticks(range(len(layers_a)), [str(layer) for layer in layers_a])
  ax.set_xlabel(f"{name_b} layer")
  ax.set_ylabel(f"{name_a} layer")
  ax.set_title(title or f"CKA: {name_a} vs {name_b}")
  fig.colorbar(image, ax=ax, label="CKA", shrink=0.8)
  return _save(fig, path)


def plot_attention_boxes(values: Mapping[str, np.ndarray], *, ylabel: str,
                         layers: Mapping[str, Sequence[int]] | None = None,
                         path: str | None = None, title: str = "") -> Figure:
  """One box per layer over its heads, one colour per model (the paper's figure).

  Args:
    values: model name -> (layers, heads) array (NaN entries are left out).
    layers: model name -> the layer number of each row; None = 1, 2, ...
  """
  names = list(values)
  layers = layers or {}
  all_layers = sorted({int(layer) for name in names
                       for layer in layers.get(name, range(1, len(values[name]) + 1))})
  slot = {layer: i for i, layer in enumerate(all_layers)}
  width = 0.8 / len(names)
  fig = Figure(figsize=(max(4.0, 0.55 * len(all_layers) * max(1, len(names) * 0.6)), 3.2),
               layout="constrained")
  ax = fig.add_subplot()
  for m, name in enumerate(names):
    array = np.asarray(values[name], np.float64)
    rows = list(layers.get(name, range(1, len(array) + 1)))
    data = [row[~np.isnan(row)] for row in array]
    offset = (m - (len(names) - 1) / 2) * width
    color = COLORS[m % len(COLORS)]
    box = ax.boxplot(data, positions=[slot[int(layer)] + offset for layer in rows],
                     widths=width * 0.85, patch_artist=True, manage_ticks=False,
                     medianprops={"color": "black"}, flierprops={"markersize": 2})
    for artist in box["boxes"]:
      artist.set_facecolor(color)
      artist.set_alpha(0.7)
    ax.plot([], [], color=color, linewidth=6, alpha=0.7, label=name)
  ax.set_xticks(range(len(all_layers)), [str(layer) for layer in all_layers])
  ax.set_xlim(-0.6, len(all_layers) - 0.4)
  ax.set_xlabel("layer")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if len(names) > 1:
    ax.legend(frameon=False, fontsize="small")
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def plot_attention_maps(image: np.ndarray, maps: np.ndarray, *, query_token: int,
                        patch_size: int, layers: Sequence[int] | None = None,
                        path: str | None = None, title: str = "") -> Figure:
  """Rows = layers: the image with the query patch outlined, then each head's attention.

  Args:
    image: (S, S, 3), uint8 or floats in [0, 1].
    maps: (layers, heads, grid, grid) attention of the query patch over the patches.
    query_token: raster index of the query patch (cls not counted).
  """
  maps = np.asarray(maps)
  num_layers, heads, grid, _ = maps.shape
  layers = list(range(1, num_layers + 1)) if layers is None else list(layers)
  image = np.asarray(image)
  image = image / 255.0 if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0)
  size = image.shape[0]
  row, col = divmod(query_token, grid)
  fig = Figure(figsize=(1.1 * (heads + 1), 1.1 * num_layers + (0.4 if title else 0.1)),
               layout="constrained")
  axes = fig.subplots(num_layers, heads + 1, squeeze=False)
  for r, layer in enumerate(layers):
    axes[r, 0].imshow(image)
    axes[r, 0].add_patch(patches.Rectangle((col * patch_size - 0.5, row * patch_size - 0.5),
                                           patch_size, patch_size, fill=False,
                                           edgecolor="cyan", linewidth=2.0))
    axes[r, 0].set_ylabel(f"layer {layer}", fontsize="small")
    for h in range(heads):
      axes[r, h + 1].imshow(maps[r, h], cmap="viridis", interpolation="nearest",
                            extent=(0, size, size, 0))
      axes[r, h + 1].plot((col + 0.5) * size / grid, (row + 0.5) * size / grid, marker="+",
                          color="red", markersize=6)
      if r == 0:
        axes[r, h + 1].set_title(f"head {h + 1}", fontsize="small")
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_reconstructions(views: Mapping[str, np.ndarray], *, path: str | None = None,
                         title: str = "") -> Figure:
  """Rows = images, columns = views (e.g. original / masked / reconstruction) in [0, 1]."""
  fig = figures.image_grid(views, title)
  return _save(fig, path)
