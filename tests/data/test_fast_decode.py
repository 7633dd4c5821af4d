"""Fast JPEG decoding (mim_jax/data/jpeg.py, data.decoder) and the pipeline benchmark's folder.

The exact path ('pil') is checked bit for bit against Pillow / torchvision's
steps written out here; the fast path ('turbo') draws the same boxes and flips
and stays within the pixel difference jpeg.py states, on real photographs
(the ones `bench_data` makes its folder from, grayscale and CMYK included).
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mim_jax import bench_data, config_defaults
from mim_jax.data import jpeg, pipeline, transforms
from mim_jax.data.sources import DataError

GRAY, CMYK = bench_data.GRAYSCALE_EVERY - 1, bench_data.CMYK_EVERY - 1


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
  return bench_data.full_size_photos()


@pytest.fixture(scope="module")
def jpegs(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
  """Benchmark-folder JPEGs (ImageNet sizes, 4:2:0, one grayscale, one CMYK) and other layouts."""
  rng = np.random.default_rng(0)
  names = sorted(photos)
  found = {f"folder{index}": bench_data.folder_jpeg(photos[names[index % len(names)]], index, rng)
           for index in [*range(14), GRAY, CMYK]}
  coffee = Image.fromarray(photos["coffee"]).resize((333, 221))
  for subsampling, progressive in [(0, False), (1, False), (2, True)]:
    buffer = io.BytesIO()
    coffee.save(buffer, format="JPEG", quality=85, subsampling=subsampling,
                progressive=progressive)
    found[f"coffee_sub{subsampling}_progressive{progressive}"] = buffer.getvalue()
  return found


def _pillow_rgb(data: bytes) -> Image.Image:
  with Image.open(io.BytesIO(data)) as image:
    return image.convert("RGB")


def _crop(data: bytes, size: int, seed: int, decoder: str) -> np.ndarray:
  crop = transforms.DecodeRandomResizedCrop(size, decoder=decoder)
  return crop.random_map({"image": data, "label": 0}, np.random.default_rng(seed))["image"]


def test_turbo_decodes_jpegs_as_pillow_does(jpegs: dict[str, bytes]):
  assert jpeg.turbo_matches_pillow()  # Pillow's and simplejpeg's wheels both ship libjpeg-turbo
  for name, data in jpegs.items():
    decoded = jpeg.decode_like_pillow(data)
    assert (decoded is None) == (name == f"folder{CMYK}"), name  # CMYK: Pillow decodes
    np.testing.assert_array_equal(np.asarray(transforms.decode_rgb(data)),
                                  np.asarray(_pillow_rgb(data)), err_msg=name)


def _torchvision_crop(data: bytes, size: int, seed: int) -> np.ndarray:
  """torchvision's steps on Pillow's decode: get_params box, crop, bicubic resize, flip."""
  decoded = _pillow_rgb(data)
  rng = np.random.default_rng(seed)
  top, left, h, w = transforms.sample_crop_box(decoded.height, decoded.width, (0.2, 1.0),
                                               (3 / 4, 4 / 3), rng)
  expected = np.asarray(decoded.crop((left, top, left + w, top + h)).resize(
      (size, size), Image.Resampling.BICUBIC))
  return expected[:, ::-1] if rng.random() < 0.5 else expected


def test_exact_path_is_torchvisions_crop_and_flip(jpegs: dict[str, bytes]):
  for name, data in jpegs.items():
    for seed in range(2):
      np.testing.assert_array_equal(_crop(data, 48, seed, "pil"), _torchvision_crop(data, 48, seed),
                                    err_msg=name)


@pytest.mark.parametrize("size", [224, 64])
def test_turbo_draws_the_same_boxes_and_flips(jpegs: dict[str, bytes], size: int):
  for name, data in jpegs.items():
    boxes, states = {}, {}
    for decoder in jpeg.DECODERS:
      rng = np.random.default_rng(7)
      sample = functools.partial(transforms.sample_crop_box, scale=(0.2, 1.0),
                                 ratio=(3 / 4, 4 / 3), rng=rng)
      crop = transforms.DecodeRandomResizedCrop(size, decoder=decoder)
      min_side = crop._min_side()  # pylint: disable=protected-access
      boxes[decoder] = transforms.decode_for_crop(data, sample, min_side, decoder=decoder)[1]
      rng = np.random.default_rng(7)
      crop.random_map({"image": data, "label": 0}, rng)
      states[decoder] = rng.bit_generator.state  # same draws, so the same flip
    assert boxes["turbo"] == boxes["pil"] and states["turbo"] == states["pil"], name


# jpeg.py states, over the 300-image benchmark folder: mean |difference| 0.68 (224 px),
# 0.94 (112), 1.76 (64; 1.55 counting its flips and CMYK). A misplaced box or a wrong
# flip makes an image's mean difference >> 10.
@pytest.mark.parametrize("size,mean_bound", [(224, 1.0), (112, 1.4), (64, 2.5)])
def test_turbo_pixels_within_the_stated_difference(jpegs: dict[str, bytes], size: int,
                                                   mean_bound: float):
  means = []
  for name, data in jpegs.items():
    for seed in range(2):
      exact = _crop(data, size, seed, "pil").astype(int)
      fast = _crop(data, size, seed, "turbo")
      assert fast.shape == (size, size, 3) and fast.dtype == np.uint8
      if name == f"folder{GRAY}":
        assert (fast == fast[..., :1]).all()
      if name == f"folder{CMYK}":
        np.testing.assert_array_equal(fast, exact)  # left to the exact path
      means.append(np.abs(fast - exact).mean())
  assert max(means) < 8, max(means)
  assert np.mean(means) < mean_bound, np.mean(means)


def test_turbo_decodes_reduced_only_while_the_crop_keeps_min_side(jpegs: dict[str, bytes]):
  assert jpeg.reduction_for((0, 0, 500, 460), 112) == 4
  assert jpeg.reduction_for((0, 0, 500, 460), 0) == 1
  assert jpeg.reduction_for((0, 0, 447, 900), 224) == 1
  assert jpeg.reduction_for((0, 0, 4000, 4000), 64) == 8
  data = jpegs["folder0"]
  height, width = jpeg.rgb_jpeg_size(data)
  assert jpeg.decode(data, 4).shape == (-(-height // 4), -(-width // 4), 3)


@pytest.mark.parametrize("decoder", jpeg.DECODERS)
def test_undecodable_images_become_markers(jpegs: dict[str, bytes], decoder: str):
  crop = transforms.DecodeRandomResizedCrop(32, decoder=decoder)
  for data in (b"", b"\xff\xd8 truncated", jpegs["folder0"][:600], b"\x89PNG\r\n\x1a\n..."):
    marker = crop.random_map({"image": data, "label": 2, "id": "bad.jpg"},
                             np.random.default_rng(0))
    assert "bad.jpg" in marker["error"] and marker["image"].shape == (0, 0, 3)


@pytest.mark.parametrize("decoder", jpeg.DECODERS)
def test_jpeg_libjpeg_warns_about_decodes_as_pillow_decides(jpegs: dict[str, bytes],
                                                            decoder: str):
  data = jpegs["folder1"]
  middle = len(data) // 2
  damaged = data[:middle] + b"\xff\xd3" + data[middle:]  # a stray restart marker: a warning
  assert jpeg.decode(damaged) is None  # strict: Pillow, which decodes it, decides
  exact = _torchvision_crop(damaged, 64, 3)
  out = _crop(damaged, 64, 3, decoder)
  if decoder == "pil":
    np.testing.assert_array_equal(out, exact)
  else:
    assert np.abs(out.astype(int) - exact).mean() < 8


def test_unknown_decoder_is_a_one_line_error(tmp_path):
  with pytest.raises(DataError, match=r"data.decoder 'fast' unknown: use 'pil' .* or 'turbo'"):
    transforms.DecodeRandomResizedCrop(16, decoder="fast")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
  path = os.fspath(tmp_path_factory.mktemp("bench_folder"))
  bench_data.make_folder(path, num_images=8)
  return path


def test_benchmark_folder_is_deterministic_and_imagenet_sized(folder: str, tmp_path):
  again = os.fspath(tmp_path / "again")
  stats = bench_data.make_folder(again, num_images=8)
  assert stats == json.loads((tmp_path / "again" / bench_data.FOLDER_STATS).read_text())
  files = sorted(os.path.relpath(os.path.join(d, f), folder)
                 for d, _, names in os.walk(folder) for f in names if f.endswith(".jpg"))
  assert len(files) == 8
  for name in files:
    with open(os.path.join(folder, name), "rb") as f, open(os.path.join(again, name), "rb") as g:
      data = f.read()
      assert data == g.read()
    with Image.open(io.BytesIO(data)) as image:
      assert image.format == "JPEG"
      assert all(bench_data.SIDE_RANGE[0] <= side <= bench_data.SIDE_RANGE[1]
                 for side in image.size)


def test_decoder_switch_reaches_the_loader(folder: str):
  config = config_defaults.base_config()
  config.data.update(kind="image_folder", data_dir=folder, worker_count=0)
  batches = {}
  for decoder in jpeg.DECODERS:
    config.data.decoder = decoder
    loader = pipeline.make_train_loader(config.data, pipeline.DataSpec.single_view(64),
                                        global_batch_size=4, seed=3)
    batches[decoder] = next(iter(loader))["image"].astype(int)
  differences = np.abs(batches["turbo"] - batches["pil"]).mean(axis=(1, 2, 3))
  assert (0 < differences).any() and (differences < 8).all(), differences
  config.data.decoder = "simd"
  with pytest.raises(DataError, match="data.decoder 'simd' unknown"):
    pipeline.make_train_loader(config.data, pipeline.DataSpec.single_view(64),
                               global_batch_size=4, seed=3)


def test_bench_data_reports_rates_and_cpu_per_image(folder: str):
  config = config_defaults.base_config()
  config.data.update(kind="image_folder", data_dir=folder, worker_count=0, decoder="turbo")
  config.batch_size, config.image_size = 4, 32
  result = bench_data.bench_data(config, steps=2, warmup=1)
  assert result["decoder"] == "turbo" and result["workers"] == 0
  for key in ("images_per_sec", "images_per_core_second", "worker_cpu_ms_per_image"):
    assert np.isfinite(result[key]) and result[key] > 0, (key, result)
