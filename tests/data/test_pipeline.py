"""Tests of mim_jax.data.transforms and mim_jax.data.pipeline (grain loaders, resume, orbax)."""

from __future__ import annotations

import io
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import pipeline, sources, transforms
from mim_jax.data.sources import DataError

NUM_TRAIN, NUM_VAL, NUM_CLASSES = 42, 11, 3


# --------------------------------------------------------------------------- #
# Fixtures: the demo data set (shared path with test_sources.py) and a folder of
# constant-colour PNGs whose colour encodes the record number, so a record can be
# identified after any crop and flip.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory):
  path = tmp_path_factory.getbasetemp() / "mim_jax_demo_tfds"
  sources.build_demo_dataset(os.fspath(path))
  config = pipeline.default_data_config()
  config.data_dir = os.fspath(path)
  return config


def _colour(record_id: int) -> int:
  return 10 + 5 * record_id


def _record_id(pixels: np.ndarray) -> int:
  return int(round((float(pixels[0, 0, 0]) - 10) / 5))


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _write_colour_folder(root: Path, split: str, count: int) -> None:
  for record_id in range(count):
    label = record_id % NUM_CLASSES
    height, width = 20 + record_id % 7 * 3, 20 + record_id % 5 * 4
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[...] = (_colour(record_id), 255 - _colour(record_id), 40 * label)
    path = root / split / f"class{label}" / f"{record_id:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(pixels))


@pytest.fixture(scope="module")
def colour_config(tmp_path_factory: pytest.TempPathFactory):
  root = tmp_path_factory.mktemp("colour_folder")
  _write_colour_folder(root, "train", NUM_TRAIN)
  _write_colour_folder(root, "val", NUM_VAL)
  config = pipeline.default_data_config()
  config.update(kind="image_folder", data_dir=os.fspath(root), eval_split="val")
  return config


def _ids(batch: dict[str, np.ndarray]) -> list[int]:
  return [_record_id(image) for image in batch["image"]]


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b) -> None:
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------- #
# RandomResizedCrop box sampling
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("height,width", [(300, 300), (120, 400), (500, 90)])
def test_crop_boxes_respect_scale_and_ratio(height: int, width: int):
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  boxes = np.array([transforms.sample_crop_box(height, width, scale, ratio, rng)
                    for _ in range(3000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  fallback = transforms.center_crop_box(height, width, ratio)
  sampled = ~np.all(boxes == fallback, axis=1)
  assert sampled.mean() > 0.5
  # Rounding each side to whole pixels moves area and ratio by < 1 px per side.
  area = h * w / (height * width)
  slack = (h + w + 1) / (height * width)
  assert (area[sampled] >= scale[0] - slack[sampled]).all()
  assert (area[sampled] <= scale[1] + slack[sampled]).all()
  aspect = w / h
  assert (aspect[sampled] >= ratio[0] * (1 - 1 / h[sampled]) - 1 / h[sampled]).all()
  assert (aspect[sampled] <= ratio[1] * (1 + 1 / h[sampled]) + 1 / h[sampled]).all()
  assert area[sampled].min() < 0.1  # The whole scale range is used.


def test_crop_aspect_ratio_is_log_uniform():
  rng = np.random.default_rng(1)
  boxes = np.array([transforms.sample_crop_box(1000, 1000, (0.05, 0.1), (0.5, 2.0), rng)
                    for _ in range(4000)])
  log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
  # Uniform in log space: symmetric around 0 and flat. Linear sampling in [0.5, 2]
  # would put the median at log(1.25) = 0.22.
  assert abs(np.median(log_aspect)) < 0.03
  counts, _ = np.histogram(log_aspect, bins=4, range=(math.log(0.5), math.log(2.0)))
  assert counts.min() > 0.85 * counts.max()


@pytest.mark.parametrize("height,width,expected", [
    (100, 400, (0, 133, 100, 133)),   # Too wide: h = 100, w = round(100 * 4/3).
    (400, 100, (133, 0, 133, 100)),   # Too tall: w = 100, h = round(100 / (3/4)).
    (90, 100, (0, 0, 90, 100)),       # Ratio within bounds: whole image.
])
def test_impossible_scale_falls_back_to_centre_crop(height, width, expected):
  rng = np.random.default_rng(0)
  box = transforms.sample_crop_box(height, width, (1.5, 2.0), (3 / 4, 4 / 3), rng)
  assert box == expected


# --------------------------------------------------------------------------- #
# Decode + crop transforms
# --------------------------------------------------------------------------- #


def _gradient_image(height: int, width: int) -> np.ndarray:
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)


def test_crop_takes_a_window_of_the_image():
  pixels = _gradient_image(80, 80)
  crop = transforms.DecodeRandomResizedCrop(40, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False)
  windows = np.lib.stride_tricks.sliding_window_view(pixels, (40, 40, 3))[:, :, 0]
  for seed in range(5):
    out = crop.random_map({"image": _png(pixels), "label": 1}, np.random.default_rng(seed))
    assert out["image"].shape == (40, 40, 3) and out["image"].dtype == np.uint8
    # A 40x40 box resized to 40x40 is a plain window: find it by brute force...
    (row,), (col,) = np.nonzero(np.all(windows == out["image"], axis=(2, 3, 4)))
    # ... at the (top, left) that the same generator draws.
    box = transforms.sample_crop_box(80, 80, (0.25, 0.25), (1.0, 1.0), np.random.default_rng(seed))
    assert (row, col) == box[:2]


def test_full_crop_is_a_bicubic_resize():
  pixels = _gradient_image(60, 90)
  crop = transforms.DecodeRandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.5, 1.5), flip=False)
  out = crop.random_map({"image": _png(pixels), "label": 4}, np.random.default_rng(0))
  reference = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(out["image"], np.asarray(reference))
  assert out["label"] == 4 and out["label"].dtype == np.int32


def test_flip_happens_about_half_the_time():
  pixels = _gradient_image(50, 70)
  flipping = transforms.DecodeRandomResizedCrop(24, scale=(1, 1), ratio=(1.4, 1.4), flip=True)
  reference = np.asarray(Image.fromarray(pixels).resize((24, 24), Image.Resampling.BICUBIC))
  flips = 0
  for seed in range(40):
    out = flipping.random_map({"image": _png(pixels), "label": 0}, np.random.default_rng(seed))
    if np.array_equal(out["image"], reference[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out["image"], reference)
  assert 8 <= flips <= 32


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(mode: str):
  image = Image.fromarray(_gradient_image(30, 40)).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
  crop = transforms.DecodeRandomResizedCrop(16)
  out = crop.random_map({"image": buffer.getvalue(), "label": 0}, np.random.default_rng(0))
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8


def test_undecodable_image_becomes_a_marker_that_is_skipped(caplog: pytest.LogCaptureFixture):
  crop = transforms.DecodeRandomResizedCrop(16)
  marker = crop.random_map({"image": b"\xff\xd8 truncated", "label": 2, "id": "bad.jpg"},
                           np.random.default_rng(0))
  assert "bad.jpg" in marker["error"]
  skip = transforms.SkipUndecodable(max_consecutive=2)
  good = crop.random_map({"image": _png(_gradient_image(20, 20)), "label": 1},
                         np.random.default_rng(0))
  with caplog.at_level(logging.WARNING):
    assert [skip.filter(r) for r in (marker, good, marker, marker, good)] == [
        False, True, False, False, True]
  assert skip.skipped == 3
  assert "3 skipped so far" in caplog.text and "bad.jpg" in caplog.text
  with pytest.raises(DataError, match="3 images in a row"):
    for _ in range(3):
      skip.filter(marker)


def test_eval_crop_matches_resize_then_centre_crop():
  pixels = _gradient_image(300, 200)
  out = transforms.DecodeCenterCrop(64, 0.875).map({"image": _png(pixels), "label": 3})
  # Hand-computed: shorter side int(64 / 0.875) = 73; 200x300 -> 73x109; crop
  # top = round((109 - 64) / 2) = 22, left = round((73 - 64) / 2) = 4.
  resized = np.asarray(Image.fromarray(pixels).resize((73, 109), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out["image"], resized[22:86, 4:68])


# --------------------------------------------------------------------------- #
# Reduced JPEG decoding (data.reduced_jpeg_decode)
# --------------------------------------------------------------------------- #

_BIG = 1024  # Side of the large test photo: a 64 px crop of it is shrunk >= 6x.


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel

  return Image.fromarray(skimage_data.astronaut()).resize((_BIG, _BIG), Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _crop(data: bytes, size: int, seed: int, reduced: bool) -> np.ndarray:
  crop = transforms.DecodeRandomResizedCrop(size, reduced_decode=reduced)
  return crop.random_map({"image": data, "label": 0}, np.random.default_rng(seed))["image"]


def _spy_resized_crop(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int],
                                                                     transforms.Box, float]]:
  """Records (decoded image size, box, scale) of every `resized_crop` call."""
  calls = []
  original = transforms.resized_crop

  def spy(image: Image.Image, box: transforms.Box, size: int, scale: float = 1.0) -> np.ndarray:
    calls.append((image.size, box, scale))
    return original(image, box, size, scale)

  monkeypatch.setattr(transforms, "resized_crop", spy)
  return calls


def test_full_decode_is_torchvisions_crop(astronaut: Image.Image):
  # The default (reduced_decode=False) against an independent PIL computation:
  # full decode, the generator's box, crop, bicubic resize, then its flip draw.
  data = _jpeg(astronaut)
  decoded = Image.open(io.BytesIO(data)).convert("RGB")
  for seed in range(4):
    rng = np.random.default_rng(seed)
    top, left, h, w = transforms.sample_crop_box(_BIG, _BIG, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    expected = np.asarray(decoded.crop((left, top, left + w, top + h)).resize(
        (64, 64), Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
      expected = expected[:, ::-1]
    np.testing.assert_array_equal(_crop(data, 64, seed, reduced=False), expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_reduced_decode_is_smaller_and_close_to_full_decode(astronaut: Image.Image, mode: str,
                                                            monkeypatch: pytest.MonkeyPatch):
  data = _jpeg(astronaut.convert(mode))
  calls = _spy_resized_crop(monkeypatch)
  for seed in range(10):
    full = _crop(data, 64, seed, reduced=False)
    reduced = _crop(data, 64, seed, reduced=True)
    assert reduced.shape == (64, 64, 3) and reduced.dtype == np.uint8
    if mode == "L":
      assert (reduced == reduced[..., :1]).all()
    (_, box, _), (size, reduced_box, scale) = calls[-2:]
    # Same random box (in full-size pixels); decoded at the largest 1/2^k that
    # keeps >= 64 px per side of the crop.
    _, _, h, w = box
    assert reduced_box == box and scale in (1 / 2, 1 / 4, 1 / 8)
    assert size == (math.ceil(_BIG * scale),) * 2
    assert min(h, w) * scale >= 64 and (scale == 1 / 8 or min(h, w) * scale / 2 < 64)
    # Same box and flip, pixels differ by the DCT-domain downscale: measured
    # 0.5-1.9 gray levels mean abs difference for these seeds (all three modes),
    # while rounding the box to whole reduced pixels gives 3.4-14 and a wrong flip > 50.
    assert np.abs(reduced.astype(int) - full).mean() < 3.0


def test_reduced_decode_of_png_is_a_full_decode(astronaut: Image.Image,
                                                monkeypatch: pytest.MonkeyPatch):
  data = _png(np.asarray(astronaut.resize((512, 512))))
  calls = _spy_resized_crop(monkeypatch)
  for seed in range(3):
    np.testing.assert_array_equal(_crop(data, 64, seed, reduced=True),
                                  _crop(data, 64, seed, reduced=False))
  assert {(size, scale) for size, _, scale in calls} == {((512, 512), 1.0)}


@pytest.mark.parametrize("size", [128, 64])  # Upsampled; shrunk < 2x.
def test_reduced_decode_needs_a_2x_shrink(astronaut: Image.Image, size: int,
                                          monkeypatch: pytest.MonkeyPatch):
  data = _jpeg(astronaut.resize((96, 96)))
  calls = _spy_resized_crop(monkeypatch)
  for seed in range(3):
    np.testing.assert_array_equal(_crop(data, size, seed, reduced=True),
                                  _crop(data, size, seed, reduced=False))
  assert {(image_size, scale) for image_size, _, scale in calls} == {((96, 96), 1.0)}


def test_reduced_decode_undecodable_image_becomes_a_marker():
  crop = transforms.DecodeRandomResizedCrop(16, reduced_decode=True)
  for data in (b"\xff\xd8 truncated", _jpeg(Image.new("RGB", (300, 300)))[:400]):
    marker = crop.random_map({"image": data, "label": 2, "id": "bad.jpg"},
                             np.random.default_rng(0))
    assert "bad.jpg" in marker["error"] and marker["image"].shape == (0, 0, 3)


# --------------------------------------------------------------------------- #
# Training loader
# --------------------------------------------------------------------------- #


def test_train_batches_cover_an_epoch_once(colour_config):
  loader = pipeline.make_train_loader(colour_config, pipeline.DataSpec.single_view(16, labels=True),
                                      global_batch_size=8, seed=0, worker_count=0, num_epochs=1)
  batches = list(loader)
  assert len(batches) == NUM_TRAIN // 8 == loader.steps_per_epoch
  for batch in batches:
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert [i % NUM_CLASSES for i in _ids(batch)] == batch["label"].tolist()
  ids = [i for batch in batches for i in _ids(batch)]
  assert len(set(ids)) == len(ids) == 40 and set(ids) <= set(range(NUM_TRAIN))
  assert ids != sorted(ids)  # Shuffled.


def test_epochs_are_reshuffled(colour_config):
  iterator = iter(pipeline.make_train_loader(colour_config, pipeline.DataSpec.single_view(8),
                                             global_batch_size=6, seed=0, worker_count=0))
  ids = [i for batch in _take(iterator, 14) for i in _ids(batch)]  # 84 = 2 epochs of 42.
  assert sorted(ids[:42]) == sorted(ids[42:]) == list(range(NUM_TRAIN))
  assert ids[:42] != ids[42:]


def test_same_seed_same_batches_other_seed_differs(demo_config):
  def first_batches(seed: int):
    loader = pipeline.make_train_loader(demo_config, pipeline.DataSpec.single_view(32),
                                        global_batch_size=4, seed=seed, worker_count=0)
    return _take(iter(loader), 2)

  _assert_same(first_batches(0), first_batches(0))
  other = first_batches(1)
  assert not np.array_equal(first_batches(0)[0]["image"], other[0]["image"])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_state_is_exact(demo_config, worker_count: int):
  def make():
    return pipeline.make_train_loader(demo_config, pipeline.DataSpec.single_view(32),
                                      global_batch_size=8, seed=5, worker_count=worker_count)

  iterator = iter(make())
  first = _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  del iterator
  resumed = iter(make())
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), expected)
  assert not np.array_equal(first[0]["image"], expected[0]["image"])


def test_processes_read_disjoint_shards(colour_config):
  seen = []
  for process_index in range(2):
    loader = pipeline.make_train_loader(colour_config, pipeline.DataSpec.single_view(8),
                                        global_batch_size=8, seed=0, worker_count=0, num_epochs=1,
                                        process_index=process_index, process_count=2)
    assert loader.local_batch_size == 4
    batches = list(loader)
    assert all(b["image"].shape[0] == 4 for b in batches)
    seen.append({i for b in batches for i in _ids(b)})
  assert len(seen[0]) == len(seen[1]) == 20
  assert not seen[0] & seen[1]


def test_corrupt_image_is_skipped_in_the_pipeline(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture):
  _write_colour_folder(tmp_path, "train", 10)
  (tmp_path / "train" / "class0" / "zz_corrupt.png").write_bytes(b"\x89PNG garbage")
  config = pipeline.default_data_config()
  config.update(kind="image_folder", data_dir=os.fspath(tmp_path))
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.make_train_loader(config, pipeline.DataSpec.single_view(8),
                                              global_batch_size=2, seed=0, worker_count=0,
                                              num_epochs=1))
  assert sorted(i for b in batches for i in _ids(b)) == list(range(10))
  assert "zz_corrupt.png" in caplog.text and "1 skipped so far" in caplog.text


def test_all_corrupt_images_raise(tmp_path: Path):
  for index in range(5):
    path = tmp_path / "train" / "cls" / f"{index}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"nothing")
  config = pipeline.default_data_config()
  config.update(kind="image_folder", data_dir=os.fspath(tmp_path))
  loader = pipeline.make_train_loader(config, pipeline.DataSpec.single_view(8), global_batch_size=2,
                                      seed=0, worker_count=0)
  with pytest.raises(DataError, match="in a row could not be decoded"):
    next(iter(loader))


@pytest.mark.parametrize("kwargs,match", [
    ({"global_batch_size": 9, "process_count": 2}, "not a positive multiple"),
    ({"global_batch_size": 64}, "exceeds the 42 records"),
    ({"global_batch_size": 4, "process_index": 2, "process_count": 2}, "process_index 2"),
    ({"global_batch_size": 4, "seed": -1}, "seed -1"),
])
def test_bad_arguments_raise_data_error(colour_config, kwargs, match):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(DataError, match=match):
    pipeline.make_train_loader(colour_config, pipeline.DataSpec.single_view(8), **kwargs)


_KILLED_PARENT_SCRIPT = """
import sys, time, psutil
from mim_jax.data import pipeline
config = pipeline.default_data_config()
config.update(kind="image_folder", data_dir=sys.argv[1])
iterator = iter(pipeline.make_train_loader(config, pipeline.DataSpec.single_view(8),
                                           global_batch_size=2, seed=0, worker_count=1))
next(iterator)
print(*[child.pid for child in psutil.Process().children(recursive=True)], flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_workers_exit_when_the_main_process_is_killed(colour_config):
  import psutil  # pylint: disable=import-outside-toplevel

  repo_root = os.fspath(Path(pipeline.__file__).parents[2])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])}
  main = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT_SCRIPT, colour_config.data_dir],
                          stdout=subprocess.PIPE, text=True, env=env)
  try:
    children = [psutil.Process(int(pid)) for pid in main.stdout.readline().split()]
  finally:
    main.kill()  # SIGKILL: no clean-up runs in the main process.
    main.wait()
  assert any("spawn_main" in " ".join(child.cmdline()) for child in children)
  _, alive = psutil.wait_procs(children, timeout=10)
  for child in alive:
    child.kill()
  assert not alive, "grain workers outlived their killed main process"


def test_reduced_jpeg_decode_config_reaches_the_crop(demo_config):
  def first_batch(reduced: bool) -> np.ndarray:
    config = demo_config.copy_and_resolve_references()
    config.reduced_jpeg_decode = reduced
    loader = pipeline.make_train_loader(config, pipeline.DataSpec.single_view(32),
                                        global_batch_size=8, seed=3, worker_count=0)
    return next(iter(loader))["image"].astype(int)

  full, reduced = first_batch(False), first_batch(True)
  # The demo JPEGs (160-256 px) shrink >= 2x to 32 px mostly: same crops, other pixels.
  assert not np.array_equal(full, reduced)
  assert np.abs(full - reduced).mean() < 3.0


# --------------------------------------------------------------------------- #
# Evaluation loader
# --------------------------------------------------------------------------- #


def test_eval_covers_the_split_once_across_processes(colour_config):
  seen = []
  for process_index in range(2):
    loader = pipeline.make_eval_loader(colour_config, global_batch_size=8, image_size=8,
                                       process_index=process_index, process_count=2,
                                       worker_count=0)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 2  # ceil(ceil(11 / 2) / 4)
    for batch in batches:
      assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].dtype == bool
      assert not batch["image"][~batch["mask"]].any()
    seen.append([i for b in batches for i, m in zip(_ids(b), b["mask"]) if m])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_VAL))
  assert (len(seen[0]), len(seen[1])) == (6, 5)


def test_eval_with_workers_matches_in_process(colour_config):
  def run(worker_count: int):
    return list(pipeline.make_eval_loader(colour_config, global_batch_size=3, image_size=8,
                                          worker_count=worker_count))

  # 11 records, batch 3: 4 batches, the last padded. Two workers each end with a
  # partial batch of their own; the loader regroups them into full batches.
  for batches in (run(0), run(2)):
    assert len(batches) == 4 and batches[-1]["mask"].tolist() == [True, True, False]
    ids = [i for b in batches for i, m in zip(_ids(b), b["mask"]) if m]
    assert sorted(ids) == list(range(NUM_VAL))


# --------------------------------------------------------------------------- #
# Checkpointing the iterator with orbax
# --------------------------------------------------------------------------- #


def test_orbax_checkpoint_manager_round_trip(demo_config, tmp_path: Path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # Slow import.

  def make():
    return pipeline.make_train_loader(demo_config, pipeline.DataSpec.single_view(16),
                                      global_batch_size=4, seed=7, worker_count=0)

  manager = ocp.CheckpointManager(
      tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
      item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  iterator = iter(make())
  _take(iterator, 2)
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  expected = _take(iterator, 2)  # Iterating on while the save may still be finishing.
  manager.wait_until_finished()
  resumed = iter(make())
  restored = manager.restore(2, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(resumed)))
  assert restored["data"] is resumed
  _assert_same(_take(resumed, 2), expected)
  manager.close()


def test_default_config_fields():
  config = pipeline.default_data_config()
  assert set(config) == {
      "kind", "name", "data_dir", "split", "eval_split", "image_key", "label_key", "crop_scale",
      "crop_ratio", "flip", "reduced_jpeg_decode", "decoder", "eval_resize_ratio", "worker_count",
      "prefetch_buffer_size", "read_threads", "read_buffer_size", "digits_size",
      "randaug_magnitude", "randaug_mstd", "randaug_num_ops", "color_jitter", "force_color_jitter"}
  assert config.kind == "demo" and tuple(config.crop_scale) == (0.2, 1.0)
  # Fine-tuning augmentation is off by default: pre-training batches are unchanged.
  assert config.randaug_magnitude is None and config.color_jitter == 0
  assert pipeline.train_augmentation(config) is None
  config.randaug_magnitude = 9  # A typed placeholder: settable from the command line.
  config.data_dir = "/some/where"  # A typed placeholder: settable from the command line.
  assert sources.config_value({"kind": "tfds"}, "worker_count") == 2
  # Off by default, also for configs written before the field existed.
  assert sources.config_value({"kind": "tfds"}, "reduced_jpeg_decode") is False
