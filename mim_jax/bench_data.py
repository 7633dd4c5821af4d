"""The input pipeline's benchmark (`bench --data`) and the folder of JPEGs it is measured on.

  python -m mim_jax.bench --data --make_folder=/tmp/bench_jpegs   # once, ~20 s
  python -m mim_jax.bench --config configs/mae_vit_tiny.py --data \
      --config.data.kind=image_folder --config.data.data_dir=/tmp/bench_jpegs \
      --config.data.worker_count=1 --config.batch_size=64 --steps=40

`make_folder` writes a deterministic image folder of real photographs at
ImageNet's size distribution, so `bench --data` numbers are comparable between
machines and between decoders without downloading ImageNet: crops of the ten
full-size photographs that ship in the scikit-image and scikit-learn wheels,
resized (Lanczos) to a side drawn like ImageNet's (long side log-normal around
430 px, clipped to [200, 1000]; aspect 1 to 1.6, a quarter portrait: mean about
410 x 360), JPEG quality 90 with 4:2:0 chroma, like most of ImageNet. Every
50th image is grayscale and every 150th CMYK, the rare cases a decoder must
still handle.

`bench_data` times the training loader alone: `warmup` batches first (the
workers start and fill their buffers), then `steps` batches; images/s per
worker is the loader's rate divided by the workers (one worker per core).
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import math
import time
from typing import Any

import numpy as np
import psutil
from PIL import Image

from mim_jax import io as mio
from mim_jax.data import pipeline
from mim_jax.data.sources import config_value

FOLDER_IMAGES = 300
FOLDER_SEED = 20240616
FOLDER_QUALITY = 90
LONG_SIDE_MEDIAN = 430       # px; ImageNet's train images: mostly 500 x 375 and smaller
LONG_SIDE_LOG_STD = 0.25
SIDE_RANGE = (200, 1000)
ASPECT_RANGE = (1.0, 1.6)    # long side / short side, log-uniform
PORTRAIT_FRACTION = 0.25
GRAYSCALE_EVERY = 50
CMYK_EVERY = 150
FOLDER_STATS = "bench_folder.json"


@functools.cache
def full_size_photos() -> dict[str, np.ndarray]:
  """The ten colour photographs of the scikit-image / scikit-learn wheels, full size (uint8 RGB).

  scikit-learn's two are read from its wheel's files, without importing it (seconds).
  """
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel

  names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry", "retina")
  photos = {name: getattr(skimage_data, name)()[..., :3] for name in names}
  photos["motorcycle"] = skimage_data.stereo_motorcycle()[0]
  scikit_learn = importlib.metadata.distribution("scikit-learn")
  for name in ("china", "flower"):
    path = scikit_learn.locate_file(f"sklearn/datasets/images/{name}.jpg")
    with Image.open(path) as image:
      photos[name] = np.asarray(image.convert("RGB"))
  return photos


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
  """(width, height) drawn like an ImageNet training image's (see the module doc)."""
  long_side = math.exp(rng.normal(math.log(LONG_SIDE_MEDIAN), LONG_SIDE_LOG_STD))
  long_side = min(max(long_side, SIDE_RANGE[0]), SIDE_RANGE[1])
  aspect = math.exp(rng.uniform(0.0, math.log(ASPECT_RANGE[1])))
  short_side = max(SIDE_RANGE[0], long_side / aspect)
  width, height = round(long_side), round(short_side)
  return (height, width) if rng.random() < PORTRAIT_FRACTION else (width, height)


def folder_jpeg(photo: np.ndarray, index: int, rng: np.random.Generator) -> bytes:
  """Image `index` of the benchmark folder: a crop of `photo` at an ImageNet-like size, as JPEG."""
  width, height = imagenet_like_size(rng)
  photo_h, photo_w = photo.shape[:2]
  # The largest crop of the target's aspect ratio, then 60-100 % of its sides.
  side_scale = min(photo_w / width, photo_h / height) * rng.uniform(0.6, 1.0)
  crop_w, crop_h = max(1, round(width * side_scale)), max(1, round(height * side_scale))
  top = int(rng.integers(0, photo_h - crop_h + 1))
  left = int(rng.integers(0, photo_w - crop_w + 1))
  image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(
      (width, height), Image.Resampling.LANCZOS)
  if index % CMYK_EVERY == CMYK_EVERY - 1:
    image = image.convert("CMYK")
  elif index % GRAYSCALE_EVERY == GRAYSCALE_EVERY - 1:
    image = image.convert("L")
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=FOLDER_QUALITY)
  return buffer.getvalue()


def make_folder(out_dir: str, num_images: int = FOLDER_IMAGES, seed: int = FOLDER_SEED,
                split: str = "train") -> dict[str, float]:
  """Writes the benchmark image folder `<out_dir>/<split>/<photo>/<index>.jpg`; returns its stats.

  Deterministic for (num_images, seed). Local or gs:// (through mim_jax.io).
  The stats go to `<out_dir>/FOLDER_STATS` last, so its presence means complete.
  """
  photos = full_size_photos()
  names = sorted(photos)
  rng = np.random.default_rng(seed)
  pixels = total_bytes = widths = heights = 0
  for index in range(num_images):
    name = names[index % len(names)]
    data = folder_jpeg(photos[name], index, rng)
    mio.write_bytes(mio.join(out_dir, split, name, f"{index:05d}.jpg"), data)
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
    widths, heights = widths + width, heights + height
    pixels, total_bytes = pixels + width * height, total_bytes + len(data)
  stats = {"images": num_images, "mean_width": widths / num_images,
           "mean_height": heights / num_images, "mean_kbytes": total_bytes / num_images / 1e3,
           "bits_per_pixel": 8 * total_bytes / pixels}
  mio.write_text(mio.join(out_dir, FOLDER_STATS), json.dumps(stats))  # last: the folder is complete
  return stats


def use_folder(config: Any, folder: str) -> None:
  """Points `config.data` at the benchmark folder `folder`, written first unless complete."""
  stats_file = mio.join(folder, FOLDER_STATS)
  if not mio.exists(stats_file):
    print(f"writing the benchmark folder of {FOLDER_IMAGES} JPEGs to {folder}")
    make_folder(folder)
  stats = json.loads(mio.read_text(stats_file))
  print("benchmark folder: " + ", ".join(f"{key} {value:.4g}" for key, value in stats.items()))
  config.data.kind = "image_folder"
  config.data.data_dir = folder
  config.data.split = "train"


def bench_data(config: Any, steps: int, warmup: int = 5) -> dict[str, float]:
  """Images/s of the training loader `config.data` describes, timed after `warmup` batches.

  The warm-up also takes every batch the workers made ahead while starting
  (`prefetch_buffer_size` + 1 each), so the timed batches are made while timed.
  Besides the wall-clock rate, reports the CPU time the worker processes (or,
  without workers, the main process) spent per image: `images_per_core_second`
  is the rate one fully used core sustains, which a machine shared with other
  jobs changes much less than the wall-clock rate.
  """
  loader = pipeline.make_train_loader(
      config.data, pipeline.DataSpec.single_view(config.image_size, augment=True),
      global_batch_size=config.batch_size, seed=config.seed)
  worker_count = config.data.worker_count
  made_ahead = (config_value(config.data, "prefetch_buffer_size") + 1) * worker_count
  iterator = iter(loader)
  for _ in range(max(warmup, made_ahead + 1, 1)):  # starts the workers
    next(iterator)
  main = psutil.Process()
  workers = main.children(recursive=True)
  cpu_before = [_cpu_seconds(p) for p in [main, *workers]]
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  elapsed = time.perf_counter() - start
  cpu = [_cpu_seconds(p) - before for p, before in zip([main, *workers], cpu_before)]
  images = steps * config.batch_size
  decode_cpu = sum(cpu[1:]) if worker_count else cpu[0]
  return {"batch": config.batch_size, "image_size": config.image_size,
          "decoder": config_value(config.data, "decoder"), "workers": worker_count,
          "images_per_sec": images / elapsed,
          "images_per_sec_per_worker": images / elapsed / max(worker_count, 1),
          "images_per_core_second": images / decode_cpu,
          "worker_cpu_ms_per_image": 1e3 * decode_cpu / images,
          "main_cpu_ms_per_image": 1e3 * cpu[0] / images if worker_count else 0.0}


def _cpu_seconds(process: psutil.Process) -> float:
  """User + system CPU seconds of `process` so far (0 once it has exited)."""
  try:
    times = process.cpu_times()
  except psutil.NoSuchProcess:
    return 0.0
  return times.user + times.system
