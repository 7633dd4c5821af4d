r"""Analyses of trained models (docs/methods.md §8): CKA, attention distance/entropy,
reconstructions.

  python -m mim_jax.analyze cka --model_a=RUN_OR_NPZ --model_b=RUN_OR_NPZ --out=DIR \
      [--name_a=MAE --name_b=D2MAE --layers_a=0,4,8,12 --num_batches=3 --batch_size=64]
  python -m mim_jax.analyze attention --model=RUN_A [--model=RUN_B ...] [--name=A ...] \
      --out=DIR [--query_token=27 --map_image=0]
  python -m mim_jax.analyze reconstruct --model=RUN --out=DIR [--num_images=4 \
      --mask_ratio=0.75 --seed=0]

Models are mim_jax workdirs (or checkpoints/<step> dirs) or converted .npz files
(`python -m mim_jax.convert from_torch`). Data: `--data=demo` (default, the embedded
demo set), `digits`, `tfds:NAME` (with `--data_dir`) or `folder:PATH`
(`PATH/<split>/<class>/<image>`); `--split` picks the split (default validation).
Images are centre-cropped to `--image_size` (default: the first model's training size).

Writes to --out:
  cka:         cka.npy (La, Lb), cka.json (layers, models, examples), cka.png
  attention:   attention_distance.npy, attention_entropy.npy ((layers, heads); with several
               models (models, layers, heads), NaN where a model has fewer), attention.json,
               attention_distance.png, attention_entropy.png, attention_maps.png (one model;
               else attention_maps_<name>.png each)
  reconstruct: reconstruction.png
"""

import io as bytes_io
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from mim_jax import cli, config_checks, io
from mim_jax.analysis import attention, cka, inputs, plots, reconstruction
from mim_jax.errors import UserError

_OUT = flags.DEFINE_string("out", None, "Output directory for arrays and figures.")
_MODEL_A = flags.DEFINE_string("model_a", None, "cka: model A (workdir or converted .npz).")
_MODEL_B = flags.DEFINE_string("model_b", None, "cka: model B (workdir or converted .npz).")
_NAME_A = flags.DEFINE_string("name_a", None, "cka: label of model A (default: file name).")
_NAME_B = flags.DEFINE_string("name_b", None, "cka: label of model B (default: file name).")
_LAYERS_A = flags.DEFINE_list("layers_a", None, "cka: layers of A (0 = embedding); default all.")
_LAYERS_B = flags.DEFINE_list("layers_b", None, "cka: layers of B (0 = embedding); default all.")
_MODEL = flags.DEFINE_multi_string("model", [], "attention / reconstruct: model(s) to analyse.")
_NAME = flags.DEFINE_multi_string("name", [], "attention / reconstruct: label per --model.")
_LAYERS = flags.DEFINE_list("layers", None, "attention: blocks (1..depth); default all.")
_QUERY_TOKEN = flags.DEFINE_integer("query_token", None,
                                    "attention: query patch of the maps (raster index, cls not "
                                    "counted); default the centre patch.")
_MAP_IMAGE = flags.DEFINE_integer("map_image", 0, "attention: which image of the split the "
                                  "attention maps show.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "reconstruct: images in the figure.")
_MASK_RATIO = flags.DEFINE_float("mask_ratio", 0.75, "reconstruct: fraction of patches masked.")
_SEED = flags.DEFINE_integer("seed", 0, "reconstruct: masking seed.")
_DECODER_LAYER = flags.DEFINE_integer("decoder_layer", None,
                                      "reconstruct: block the decoder reads; default the run's "
                                      "config (workdir) or the last block (.npz).")
_NORM_PIX = flags.DEFINE_boolean("norm_pix_loss", None,
                                 "reconstruct: the decoder predicts normalised patches; "
                                 "default the run's config (workdir) or true (.npz).")
_DATA = flags.DEFINE_string("data", "demo", f"Data: {inputs.DATA_SPECS}.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (or demo/digits cache).")
_SPLIT = flags.DEFINE_string("split", "validation", "Split to read.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None,
                                   "Image side; default the first model's training size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size (CKA needs >= 4).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 0, "Batches to average over; 0 = the split.")


def _ints(values: Sequence[str] | None, flag: str) -> list[int] | None:
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UserError(f"--{flag}={','.join(values)} must be comma-separated integers") from None


def _write_json(path: str, content: dict[str, Any]) -> None:
  io.write_text(path, json.dumps(content, indent=2))


def _write_npy(path: str, array: np.ndarray) -> None:
  buffer = bytes_io.BytesIO()
  np.save(buffer, array)
  io.write_bytes(path, buffer.getvalue())


def _data_description(data: str, split: str, image_size: int) -> dict[str, Any]:
  return {"data": data, "split": split, "image_size": image_size}


def run_cka(model_a: str, model_b: str, out: str, *, name_a: str | None = None,
            name_b: str | None = None, layers_a: Sequence[int] | None = None,
            layers_b: Sequence[int] | None = None, data: str = "demo",
            data_dir: str | None = None, split: str = "validation",
            image_size: int | None = None, batch_size: int = 64,
            num_batches: int = 0) -> cka.CkaResult:
  """Writes cka.npy, cka.json and cka.png to `out`."""
  cka.check_batch_size(batch_size)
  a = inputs.load_model(model_a, image_size, name_a)
  b = inputs.load_model(model_b, a.image_size, name_b)
  config = inputs.data_config(data, data_dir=data_dir, split=split, image_size=a.image_size)
  batches = inputs.batches(config, batch_size=batch_size, image_size=a.image_size,
                           num_batches=num_batches)
  result = cka.cka_between(a, b, batches, layers_a=layers_a, layers_b=layers_b)
  io.makedirs(out)
  _write_npy(io.join(out, "cka.npy"), result.matrix)
  _write_json(io.join(out, "cka.json"), {
      "model_a": {**a.describe(), "layers": list(result.layers_a)},
      "model_b": {**b.describe(), "layers": list(result.layers_b)},
      "cka": result.matrix.tolist(),  # rows: model A's layers, columns: model B's
      "num_examples": result.num_examples, "num_batches": result.num_batches,
      "batch_size": batch_size, **_data_description(data, split, a.image_size),
  })
  plots.plot_cka(result.matrix, name_a=a.name, name_b=b.name, layers_a=result.layers_a,
                 layers_b=result.layers_b, path=io.join(out, "cka.png"))
  logging.info("CKA of %s vs %s over %d examples written to %s", a.name, b.name,
               result.num_examples, out)
  return result


def _padded(arrays: list[np.ndarray]) -> np.ndarray:
  """One (layers, heads) array, or (models, layers, heads) with NaN where a model has fewer."""
  if len(arrays) == 1:
    return arrays[0]
  shape = (len(arrays), max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays))
  stacked = np.full(shape, np.nan)
  for i, array in enumerate(arrays):
    stacked[i, :array.shape[0], :array.shape[1]] = array
  return stacked


def _names(paths: Sequence[str], names: Sequence[str]) -> list[str]:
  if names and len(names) != len(paths):
    raise UserError(f"{len(names)} --name for {len(paths)} --model; give one per model or none")
  names = list(names) or [inputs.default_name(path) for path in paths]
  if len(set(names)) != len(names):
    raise UserError(f"model names {names} repeat; give each --model its own --name")
  return names


def _file_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_attention(models: Sequence[str], out: str, *, names: Sequence[str] = (),
                  layers: Sequence[int] | None = None, query_token: int | None = None,
                  map_image: int = 0, data: str = "demo", data_dir: str | None = None,
                  split: str = "validation", image_size: int | None = None,
                  batch_size: int = 64, num_batches: int = 0
                  ) -> dict[str, attention.AttentionStatistics]:
  """Writes the attention distance/entropy arrays, attention.json and the figures."""
  if not models:
    raise UserError("attention needs at least one --model")
  if map_image < 0:
    raise UserError(f"--map_image={map_image} must be >= 0")
  names = _names(models, names)
  loaded = []
  for path, name in zip(models, names):
    loaded.append(inputs.load_model(path, image_size or (loaded[0].image_size if loaded
                                                         else None), name))
  size = loaded[0].image_size
  config = inputs.data_config(data, data_dir=data_dir, split=split, image_size=size)
  map_images = inputs.first_images(config, map_image + 1, size)
  if len(map_images) <= map_image:
    raise UserError(f"--map_image={map_image} but split {split!r} has {len(map_images)} images")
  stats, figures = {}, []
  io.makedirs(out)
  for model in loaded:
    batches = inputs.batches(config, batch_size=batch_size, image_size=size,
                             num_batches=num_batches)
    stats[model.name] = attention.attention_statistics(model, batches, layers=layers)
    query = attention.centre_token(model.layout.grid) if query_token is None else query_token
    maps = attention.attention_maps(model, map_images[map_image:map_image + 1], query,
                                    layers=stats[model.name].layers)
    figure = ("attention_maps.png" if len(loaded) == 1
              else f"attention_maps_{_file_name(model.name)}.png")
    plots.plot_attention_maps(map_images[map_image], maps[0], query_token=query,
                              patch_size=model.patch_size, layers=stats[model.name].layers,
                              path=io.join(out, figure),
                              title=f"{model.name}: attention of patch {query}")
    figures.append(figure)
  for kind, label in (("distance", "attention distance (px)"), ("entropy", "attention entropy")):
    values = {name: getattr(s, kind) for name, s in stats.items()}
    _write_npy(io.join(out, f"attention_{kind}.npy"), _padded(list(values.values())))
    plots.plot_attention_boxes(values, ylabel=label,
                               layers={name: s.layers for name, s in stats.items()},
                               path=io.join(out, f"attention_{kind}.png"))
  _write_json(io.join(out, "attention.json"), {
      "models": [{**model.describe(), "layers": list(stats[model.name].layers),
                  "num_images": stats[model.name].num_images,
                  "distance_px": stats[model.name].distance.tolist(),
                  "entropy": stats[model.name].entropy.tolist()} for model in loaded],
      "array_layout": ("(layers, heads)" if len(loaded) == 1
                       else "(models, layers, heads), NaN-padded"),
      "attention_maps": figures, "map_image": map_image, "batch_size": batch_size,
      **_data_description(data, split, size),
  })
  logging.info("Attention statistics of %s written to %s", ", ".join(names), out)
  return stats


def run_reconstruct(model: str, out: str, *, name: str | None = None, num_images: int = 4,
                    mask_ratio: float = 0.75, seed: int = 0, decoder_layer: int | None = None,
                    norm_pix_loss: bool | None = None, data: str = "demo",
                    data_dir: str | None = None, split: str = "validation",
                    image_size: int | None = None) -> dict[str, np.ndarray]:
  """Writes reconstruction.png (original / masked / reconstruction per image)."""
  autoencoder = inputs.load_autoencoder(model, image_size, decoder_layer=decoder_layer,
                                        norm_pix_loss=norm_pix_loss, name=name)
  config = inputs.data_config(data, data_dir=data_dir, split=split,
                              image_size=autoencoder.image_size)
  images = inputs.first_images(config, num_images, autoencoder.image_size)
  views = reconstruction.reconstruct(autoencoder, images, mask_ratio=mask_ratio, seed=seed)
  path = io.join(out, "reconstruction.png")
  plots.plot_reconstructions(views, path=path,
                             title=f"{autoencoder.name}, mask ratio {mask_ratio}")
  logging.info("Reconstructions of %d images written to %s", len(images), path)
  return views


def _common() -> dict[str, Any]:
  return dict(data=_DATA.value, data_dir=_DATA_DIR.value, split=_SPLIT.value,
              image_size=_IMAGE_SIZE.value)


def _single_model() -> tuple[str, str | None]:
  if len(_MODEL.value) != 1:
    raise UserError(f"reconstruct takes one --model, got {len(_MODEL.value)}")
  return _MODEL.value[0], (_NAME.value or [None])[0]


def _command(name: str):
  if name == "cka":
    if not _MODEL_A.value or not _MODEL_B.value:
      raise UserError("cka needs --model_a and --model_b")
    return lambda: run_cka(_MODEL_A.value, _MODEL_B.value, _OUT.value, name_a=_NAME_A.value,
                           name_b=_NAME_B.value, layers_a=_ints(_LAYERS_A.value, "layers_a"),
                           layers_b=_ints(_LAYERS_B.value, "layers_b"),
                           batch_size=_BATCH_SIZE.value, num_batches=_NUM_BATCHES.value,
                           **_common())
  if name == "attention":
    return lambda: run_attention(_MODEL.value, _OUT.value, names=_NAME.value,
                                 layers=_ints(_LAYERS.value, "layers"),
                                 query_token=_QUERY_TOKEN.value, map_image=_MAP_IMAGE.value,
                                 batch_size=_BATCH_SIZE.value, num_batches=_NUM_BATCHES.value,
                                 **_common())
  model, model_name = _single_model()
  return lambda: run_reconstruct(model, _OUT.value, name=model_name,
                                 num_images=_NUM_IMAGES.value, mask_ratio=_MASK_RATIO.value,
                                 seed=_SEED.value, decoder_layer=_DECODER_LAYER.value,
                                 norm_pix_loss=_NORM_PIX.value, **_common())


COMMANDS = ("cka", "attention", "reconstruct")
# The flags each command reads (besides --out and the data flags, which all read).
COMMAND_FLAGS = {
    "cka": ("model_a", "model_b", "name_a", "name_b", "layers_a", "layers_b", "batch_size",
            "num_batches"),
    "attention": ("model", "name", "layers", "query_token", "map_image", "batch_size",
                  "num_batches"),
    "reconstruct": ("model", "name", "num_images", "mask_ratio", "seed", "decoder_layer",
                    "norm_pix_loss"),
}


def check_arguments(argv: Sequence[str]) -> str:
  """The command, after checking the flags it reads; every mistake is one UserError line."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    got = " ".join(argv[1:]) or "none"
    raise UserError(f"give one command: {' | '.join(COMMANDS)} (got {got!r})")
  command = argv[1]
  for flag in sorted({f for flags_ in COMMAND_FLAGS.values() for f in flags_}):
    if flags.FLAGS[flag].present and flag not in COMMAND_FLAGS[command]:
      users = [name for name, names in COMMAND_FLAGS.items() if flag in names]
      raise UserError(f"--{flag} does not apply to {command}; it is a flag of "
                      f"{' and '.join(users)}")
  if not _OUT.value:
    raise UserError("--out is required: the directory for the arrays and figures")
  config_checks.check_output_dir(_OUT.value, "--out", "a directory for the arrays and figures")
  minimums = {"batch_size": 1, "num_batches": 0, "num_images": 1, "map_image": 0}
  for flag, minimum in minimums.items():
    if flags.FLAGS[flag].value < minimum:
      raise UserError(f"--{flag}={flags.FLAGS[flag].value} must be >= {minimum}")
  for flag in ("image_size", "query_token"):  # None = the default
    value, minimum = flags.FLAGS[flag].value, 1 if flag == "image_size" else 0
    if value is not None and value < minimum:
      raise UserError(f"--{flag}={value} must be >= {minimum} (or left out for the default)")
  if not 0.0 < _MASK_RATIO.value < 1.0:
    raise UserError(f"--mask_ratio={_MASK_RATIO.value} must be in (0, 1)")
  return command


def main(argv: Sequence[str]) -> None:
  cli.run_reporting_user_errors(lambda: _command(check_arguments(argv))())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
