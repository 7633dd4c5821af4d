"""Tests of mim_jax.data.sources: the demo data set, TFDS reading, image folders, errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim_jax.data import sources
from mim_jax.data.sources import DataError

DEMO_SIZES = {"train": 2000, "validation": 200}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """The demo data set, built once per session (test_pipeline.py uses the same path)."""
  path = tmp_path_factory.getbasetemp() / "mim_jax_demo_tfds"
  sources.build_demo_dataset(os.fspath(path))
  return os.fspath(path)


def _demo_config(data_dir: str) -> dict[str, str]:
  return {"kind": "demo", "data_dir": data_dir}


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


# --------------------------------------------------------------------------- #
# Demo data set
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("split", sorted(DEMO_SIZES))
def test_demo_reads_back_through_tfds(demo_dir: str, split: str):
  source = sources.get_source(_demo_config(demo_dir), split)
  assert isinstance(source, sources.TfdsSource)
  assert len(source) == DEMO_SIZES[split]
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert labels.min() == 0 and labels.max() == len(sources.DEMO_CLASSES) - 1
  assert np.bincount(labels).tolist() == [len(source) // len(sources.DEMO_CLASSES)] * 10
  record = source[7]
  # JPEG, undecoded.
  assert isinstance(record["image"], bytes) and record["image"][:2] == b"\xff\xd8"
  assert isinstance(record["label"], int)


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
  q = pixels.reshape(-1, 3).astype(int) // 64
  counts = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64)
  return counts / counts.sum()


def test_demo_images_are_crops_of_their_labelled_photo(demo_dir: str):
  source = sources.get_source(_demo_config(demo_dir), "train")
  photo_histograms = np.stack([_colour_histogram(p) for p in sources.demo_photos()])
  matches = 0
  for index in range(0, 2000, 20):
    record = source[index]
    image = np.asarray(Image.open(io.BytesIO(record["image"])))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert 160 <= max(image.shape[:2]) <= 256
    assert image.std() > 5  # A real picture, not a constant.
    # Independent check of label == source photo: nearest photo by colour histogram.
    overlap = np.minimum(_colour_histogram(image), photo_histograms).sum(1)
    matches += int(overlap.argmax() == record["label"])
  assert matches >= 90  # Of 100; a few small crops are ambiguous.
  assert len({source[i]["image"] for i in range(50)}) == 50


def test_demo_never_imports_tensorflow(demo_dir: str):
  # pylint: disable-next=expression-not-assigned
  sources.get_source(_demo_config(demo_dir), "validation")[0]
  assert "tensorflow" not in sys.modules


def test_second_build_is_a_noop(demo_dir: str, monkeypatch: pytest.MonkeyPatch):
  before = {p: p.stat().st_mtime_ns for p in Path(demo_dir).rglob("*")}

  def fail(*args, **kwargs):
    raise AssertionError("download_and_prepare called on a built data set")

  monkeypatch.setattr(sources.MimJaxDemo, "download_and_prepare", fail)
  sources.build_demo_dataset(demo_dir)
  sources.get_source(_demo_config(demo_dir), "train")
  assert {p: p.stat().st_mtime_ns for p in Path(demo_dir).rglob("*")} == before


def test_half_built_demo_is_not_taken_for_built(tmp_path: Path):
  dataset_dir = tmp_path / sources.DEMO_DATASET_NAME
  (dataset_dir / "incomplete.ABC123_1.0.0").mkdir(parents=True)  # A killed TFDS build.
  (dataset_dir / "incomplete.ABC123_1.0.0" / "dataset_info.json").write_text("{}")
  assert not sources.MimJaxDemo(data_dir=os.fspath(tmp_path)).is_prepared()
  (dataset_dir / "1.0.0").mkdir()  # Version dir without dataset_info.json.
  assert not sources.MimJaxDemo(data_dir=os.fspath(tmp_path)).is_prepared()


def test_tfds_kind_reads_the_same_records_with_slicing(demo_dir: str):
  demo = sources.get_source(_demo_config(demo_dir), "validation")
  config = {"kind": "tfds", "name": sources.DEMO_DATASET_NAME, "data_dir": demo_dir}
  sliced = sources.get_source(config, "validation[10:20]")
  assert len(sliced) == 10
  assert [sliced[i]["image"] for i in range(10)] == [demo[10 + i]["image"] for i in range(10)]


# --------------------------------------------------------------------------- #
# Image folder
# --------------------------------------------------------------------------- #


def _write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def test_image_folder_labels_by_sorted_class(tmp_path: Path):
  rng = np.random.default_rng(0)
  files = {
      "train/zebra/b.png": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)),
      "train/zebra/a.JPEG": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)),  # Case-insensitive.
      "train/ant/nested/c.jpg": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)),
      "train/ant/broken.png": b"not an image",  # Listed; decoding is the transform's job.
      "train/moth/notes.txt": b"ignored",  # Not an image: moth is an empty class.
      "val/ant/x.png": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)),
  }
  for name, data in files.items():
    _write(tmp_path / name, data)
  source = sources.get_source({"kind": "image_folder", "data_dir": os.fspath(tmp_path)}, "train")
  assert source.classes == ["ant", "moth", "zebra"]
  assert len(source) == 4
  got = {os.path.relpath(source[i]["id"], tmp_path): (source[i]["label"], source[i]["image"])
         for i in range(len(source))}
  assert got == {"train/ant/broken.png": (0, files["train/ant/broken.png"]),
                 "train/ant/nested/c.jpg": (0, files["train/ant/nested/c.jpg"]),
                 "train/zebra/a.JPEG": (2, files["train/zebra/a.JPEG"]),
                 "train/zebra/b.png": (2, files["train/zebra/b.png"])}
  assert "train" in repr(source) and os.fspath(tmp_path) not in repr(source)


def test_image_folder_follows_symlinks_and_expands_the_user(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
  # Class folders and sub-folders linked from elsewhere, as ImageNet set-ups often are.
  _write(tmp_path / "elsewhere" / "cats" / "a.png", b"a")
  _write(tmp_path / "elsewhere" / "more" / "b.png", b"b")
  _write(tmp_path / "root" / "train" / "dogs" / "c.png", b"c")
  (tmp_path / "root" / "train" / "cats").symlink_to(tmp_path / "elsewhere" / "cats")
  (tmp_path / "root" / "train" / "dogs" / "more").symlink_to(tmp_path / "elsewhere" / "more")
  monkeypatch.setenv("HOME", os.fspath(tmp_path))
  source = sources.get_source({"kind": "image_folder", "data_dir": "~/root/"}, "train")
  assert source.classes == ["cats", "dogs"]
  records = [source[i] for i in range(len(source))]
  assert [(r["image"], r["label"]) for r in records] == [(b"a", 0), (b"c", 1), (b"b", 1)]
  assert records[0]["id"] == os.fspath(tmp_path / "root" / "train" / "cats" / "a.png")


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def _error(config: dict[str, object], split: str = "train") -> str:
  with pytest.raises(DataError) as info:
    sources.get_source(config, split)
  message = str(info.value)
  assert "\n" not in message and isinstance(info.value, ValueError)
  return message


def test_error_missing_tfds_data_dir(tmp_path: Path):
  missing = os.fspath(tmp_path / "nope")
  message = _error({"kind": "tfds", "name": "imagenet2012", "data_dir": missing})
  assert missing in message and "tfds build imagenet2012" in message
  assert "--file_format=array_record" in message and "--manual_dir" in message


def test_error_unprepared_tfds_dataset(tmp_path: Path):
  message = _error({"kind": "tfds", "name": "imagenet2012", "data_dir": os.fspath(tmp_path)})
  assert "not prepared" in message and os.fspath(tmp_path) in message
  assert "tfds build imagenet2012" in message


def test_error_unknown_tfds_name(tmp_path: Path):
  message = _error({"kind": "tfds", "name": "no_such_dataset", "data_dir": os.fspath(tmp_path)})
  assert "no_such_dataset" in message and len(message) < 300


def test_error_tfrecord_dataset(demo_dir: str, tmp_path: Path):
  version_dir = tmp_path / sources.DEMO_DATASET_NAME / "1.0.0"
  version_dir.mkdir(parents=True)
  built = Path(demo_dir) / sources.DEMO_DATASET_NAME / "1.0.0"
  for name in ("features.json", "label.labels.txt"):
    shutil.copy(built / name, version_dir / name)
  info = json.loads((built / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  message = _error({"kind": "tfds", "name": sources.DEMO_DATASET_NAME,
                    "data_dir": os.fspath(tmp_path)})
  assert "tfrecord" in message and "--file_format=array_record" in message


def test_error_unknown_split(demo_dir: str):
  message = _error(_demo_config(demo_dir), "test")
  assert "'test'" in message and "validation" in message


def test_error_unknown_kind():
  assert "'lmdb'" in _error({"kind": "lmdb"})


def test_error_image_folder_missing_root(tmp_path: Path):
  missing = os.fspath(tmp_path / "nope")
  assert missing in _error({"kind": "image_folder", "data_dir": missing})
  assert "data_dir" in _error({"kind": "image_folder", "data_dir": None})
  _write(tmp_path / "a_file", b"")
  assert "a_file' does not exist or is not a directory" in _error(
      {"kind": "image_folder", "data_dir": os.fspath(tmp_path / "a_file")})


def test_error_tfds_data_dir_is_a_file(tmp_path: Path):
  _write(tmp_path / "a_file", b"")
  message = _error({"kind": "tfds", "name": "imagenet2012",
                    "data_dir": os.fspath(tmp_path / "a_file")})
  assert "a_file' is not an existing directory" in message


def test_error_demo_cache_must_be_a_local_directory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
  monkeypatch.chdir(tmp_path)
  for kind in ("demo", "digits"):
    message = _error({"kind": kind, "data_dir": "gs://bucket/cache"})
    assert "'gs://bucket/cache' is remote" in message and f"kind='{kind}'" in message
  assert not list(tmp_path.iterdir())  # No local directory named 'gs:'.
  _write(tmp_path / "a_file", b"")
  message = _error({"kind": "demo", "data_dir": os.fspath(tmp_path / "a_file" / "cache")})
  assert "Cannot create the data cache directory" in message and "a_file" in message


def test_error_image_folder_missing_split(tmp_path: Path):
  (tmp_path / "train" / "cls").mkdir(parents=True)
  message = _error({"kind": "image_folder", "data_dir": os.fspath(tmp_path)}, "val")
  assert "val" in message and "train" in message


def test_error_image_folder_empty(tmp_path: Path):
  (tmp_path / "train").mkdir()
  assert "no class" in _error({"kind": "image_folder", "data_dir": os.fspath(tmp_path)})
  (tmp_path / "train" / "cls").mkdir()
  (tmp_path / "train" / "cls" / "readme.txt").write_text("x")
  assert "no images" in _error({"kind": "image_folder", "data_dir": os.fspath(tmp_path)})
