"""`python -m mim_jax.data.prepare`: a resized TFDS copy, read back as data.kind='tfds'."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim_jax.data import pipeline, prepare, sources
from mim_jax.data.sources import DataError

SHORT_SIDE = 40
CLASSES = ("cat", "dog", "fox")


def _encoded(size: tuple[int, int], seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, size[0] * size[1]).reshape(size[1], size[0], 1)
  pixels = np.clip(ramp + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
  return buffer.getvalue()


# (class, file, bytes, expected (width, height) after preparing, or None: bytes kept)
_TRAIN = [
    ("cat", "big.jpg", _encoded((90, 60), 0), (60, SHORT_SIDE)),  # 90*40/60 = 60
    ("cat", "portrait.jpg", _encoded((50, 83), 1), (SHORT_SIDE, 66)),  # int(40*83/50) = 66
    ("cat", "small.jpg", _encoded((30, 44), 2), None),
    ("dog", "big.png", _encoded((64, 48), 3, "PNG"), (53, SHORT_SIDE)),
    ("dog", "small.png", _encoded((20, 30), 4, "PNG"), (20, 30)),  # re-encoded as JPEG
    ("dog", "cmyk.jpg", _encoded((80, 80), 5, mode="CMYK"), (SHORT_SIDE, SHORT_SIDE)),
    ("fox", "gray.jpg", _encoded((70, 45), 6, mode="L"), (62, SHORT_SIDE)),
    ("fox", "broken.jpg", b"\xff\xd8 not a jpeg", None),
    ("fox", "wide.jpg", _encoded((120, 41), 7), (117, SHORT_SIDE)),
]
_VAL = [("cat", "v0.jpg", _encoded((48, 48), 8), (SHORT_SIDE, SHORT_SIDE)),
        ("fox", "v1.jpg", _encoded((33, 33), 9), None)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  root = tmp_path_factory.mktemp("folder")
  for split, files in (("train", _TRAIN), ("val", _VAL)):
    for name in CLASSES:
      (root / split / name).mkdir(parents=True)
    for label, name, data, _ in files:
      (root / split / label / name).write_bytes(data)
  return root


def _config(**values) -> object:
  config = pipeline.default_data_config()
  config.update(**values)
  return config


def _prepare(folder: Path, out: Path, **kwargs) -> str:
  kwargs.setdefault("log", lambda line: None)
  return prepare.prepare(_config(kind="image_folder", data_dir=os.fspath(folder)),
                         out_dir=os.fspath(out), out_name="tiny_40", shard_size=4,
                         resize=prepare.Resize(SHORT_SIDE, 90), **kwargs)


def _records(out: Path, split: str) -> list[dict]:
  source = sources.get_source(_config(kind="tfds", name="tiny_40", data_dir=os.fspath(out)), split)
  return [source[index] for index in range(len(source))]


@pytest.fixture(scope="module")
def prepared(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
  out = tmp_path_factory.mktemp("prepared")
  _prepare(folder, out)
  return out


@pytest.mark.parametrize("split,files", [("train", _TRAIN), ("val", _VAL)])
def test_copy_reads_back_with_labels_ids_and_sizes(folder: Path, prepared: Path, split: str,
                                                   files: list):
  records = _records(prepared, split)
  original = sources.ImageFolderSource(os.fspath(folder), split)
  assert len(records) == len(files) == len(original)
  for index, record in enumerate(records):
    source_record = original[index]
    assert record["label"] == source_record["label"] and record["id"] == source_record["id"]
    label, name, data, size = next(f for f in files if source_record["id"].endswith(
        os.path.join(f[0], f[1])))
    assert record["label"] == CLASSES.index(label)
    if size is None:
      assert record["image"] == data  # small JPEG or unreadable: the original bytes
      continue
    with Image.open(io.BytesIO(record["image"])) as image:
      assert image.format == "JPEG" and image.size == size, name


def test_copy_is_a_tfds_data_set_the_loaders_read(prepared: Path):
  config = _config(kind="tfds", name="tiny_40", data_dir=os.fspath(prepared), eval_split="val",
                   worker_count=0)
  loader = pipeline.make_eval_loader(config, global_batch_size=2, image_size=16, with_labels=True)
  assert loader.num_classes == len(CLASSES) and loader.num_records == len(_VAL)
  batches = list(loader)
  assert [int(label) for b in batches for label, m in zip(b["label"], b["mask"]) if m] == [0, 2]
  train = pipeline.make_train_loader(config, pipeline.DataSpec.single_view(16, labels=True),
                                     global_batch_size=4, seed=0, num_epochs=1)
  images = [b["image"] for b in train]  # the broken file is skipped, as from the folder
  assert len(images) == 2 and all(i.shape == (4, 16, 16, 3) for i in images)


def test_interrupted_copy_resumes_with_the_missing_shards(folder: Path, prepared: Path,
                                                          tmp_path: Path):
  lines = []

  def stop_after_first_shard(line: str) -> None:
    lines.append(line)
    if line.lstrip().startswith("1/") and "shards," in line:  # the progress line, not a path
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _prepare(folder, tmp_path, log=stop_after_first_shard)
  target = tmp_path / "tiny_40" / prepare.VERSION
  assert not (target / "dataset_info.json").exists()  # not readable while incomplete
  assert len(json.loads((target / prepare.MANIFEST).read_text())["done"]) == 1
  with pytest.raises(DataError, match=r"unfinished copy made with other settings \(short_side"):
    prepare.prepare(_config(kind="image_folder", data_dir=os.fspath(folder)),
                    out_dir=os.fspath(tmp_path), out_name="tiny_40", shard_size=4,
                    resize=prepare.Resize(SHORT_SIDE + 1, 90), log=lambda line: None)
  lines.clear()
  _prepare(folder, tmp_path, log=lines.append)
  assert "3 shards" in lines[0] and "(1 shards already there)" in lines[0]
  for split in ("train", "val"):
    assert _records(tmp_path, split) == _records(prepared, split)
  _prepare(folder, tmp_path, log=lines.append)
  assert lines[-1].endswith("is already prepared.")


def test_a_worker_process_writes_the_same_copy(folder: Path, prepared: Path, tmp_path: Path):
  _prepare(folder, tmp_path, workers=1)
  for split in ("train", "val"):
    assert _records(tmp_path, split) == _records(prepared, split)


@pytest.mark.parametrize("name,match", [
    ("Imagenet", "not a TFDS data set name"),
    ("imagenet2012", "is a registered TFDS data set"),
])
def test_bad_output_name_is_one_line(folder: Path, tmp_path: Path, name: str, match: str):
  with pytest.raises(DataError, match=match):
    prepare.prepare(_config(kind="image_folder", data_dir=os.fspath(folder)),
                    out_dir=os.fspath(tmp_path), out_name=name)


def test_bad_settings_are_one_line():
  with pytest.raises(DataError, match="--short_side -1 / --quality 90 invalid"):
    prepare.Resize(-1, 90)
