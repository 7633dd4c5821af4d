"""Labels through the pipeline, the digits data set, and fine-tuning augmentation in the loaders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mim_jax.data import pipeline, sources
from mim_jax.data.sources import DataError

DIGITS_SIZE = 32  # Smaller than the default 64: faster to build in tests.
DIGITS_SPLITS = {"train": 1442, "validation": 355}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  path = tmp_path_factory.getbasetemp() / "mim_jax_digits_tfds"
  sources.build_digits_dataset(os.fspath(path), DIGITS_SIZE)
  return os.fspath(path)


def _digits_config(data_dir: str, **overrides):
  config = pipeline.default_data_config()
  config.update(kind="digits", data_dir=data_dir, digits_size=DIGITS_SIZE, **overrides)
  return config


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  path = tmp_path_factory.getbasetemp() / "mim_jax_demo_tfds"  # Shared with the other data tests.
  sources.build_demo_dataset(os.fspath(path))
  return os.fspath(path)


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def _digit_records(data_dir: str, split: str) -> dict[int, tuple[int, bytes]]:
  """{position in load_digits: (label, png)} read straight from TFDS (with the 'index' feature)."""
  builder = sources.MimJaxDigits(data_dir=data_dir, config=f"{DIGITS_SIZE}px")
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return {int(r["index"]): (int(r["label"]), bytes(r["image"])) for r in source}


# --------------------------------------------------------------------------- #
# The digits data set
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("split", sorted(DIGITS_SPLITS))
def test_digits_splits_read_through_tfds(digits_dir: str, split: str):
  source = sources.get_source(_digits_config(digits_dir), split)
  assert isinstance(source, sources.TfdsSource)
  assert len(source) == DIGITS_SPLITS[split]
  assert source.num_classes == 10 and source.has_labels
  record = source[3]
  assert record["image"][:8] == b"\x89PNG\r\n\x1a\n" and isinstance(record["label"], int)
  # The size is part of the name grain's checkpoints compare, the directory is not.
  assert f"mim_jax_digits/{DIGITS_SIZE}px" in repr(source) and digits_dir not in repr(source)


def test_digits_split_is_fixed_stratified_and_complete(digits_dir: str):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  targets = load_digits().target
  train = _digit_records(digits_dir, "train")
  validation = _digit_records(digits_dir, "validation")
  assert not set(train) & set(validation)
  assert sorted(set(train) | set(validation)) == list(range(len(targets)))
  for records in (train, validation):
    assert all(label == targets[index] for index, (label, _) in records.items())
  class_sizes = np.bincount(targets)
  validation_sizes = np.bincount([label for label, _ in validation.values()], minlength=10)
  np.testing.assert_allclose(validation_sizes / class_sizes, 0.2, atol=0.01)  # Stratified.
  assert (validation_sizes == class_sizes // 5).all()


def test_digits_images_are_the_upsampled_digits(digits_dir: str):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  originals = load_digits().images
  records = {**_digit_records(digits_dir, "train"), **_digit_records(digits_dir, "validation")}
  block = DIGITS_SIZE // 8
  correlations = []
  for index, (_, png) in records.items():
    image = _decode(png)
    assert image.shape == (DIGITS_SIZE, DIGITS_SIZE, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    back = image[..., 0].astype(float).reshape(8, block, 8, block).mean((1, 3))  # Box downsampling.
    correlations.append(np.corrcoef(back.ravel(), originals[index].ravel())[0, 1])
  assert len(correlations) == 1797
  assert min(correlations) > 0.9 and np.median(correlations) > 0.97
  # Digits are white on black: ink (value 16) is bright.
  brightest = max(records, key=lambda i: originals[i].sum())
  assert _decode(records[brightest][1]).mean() > 60


def test_digits_build_is_deterministic_and_per_size(digits_dir: str, tmp_path: Path):
  rebuilt = sources.build_digits_dataset(os.fspath(tmp_path), DIGITS_SIZE)
  assert rebuilt.builder_config.image_size == DIGITS_SIZE
  assert _digit_records(os.fspath(tmp_path), "validation") == _digit_records(digits_dir,
                                                                             "validation")
  other = sources.get_source({"kind": "digits", "data_dir": os.fspath(tmp_path),
                              "digits_size": 12}, "validation")  # Not a predefined size.
  assert _decode(other[0]["image"]).shape == (12, 12, 3)
  configs = sorted(p.name for p in (tmp_path / sources.DIGITS_DATASET_NAME).iterdir()
                   if not p.name.startswith("."))
  assert configs == ["12px", f"{DIGITS_SIZE}px"]


def test_digits_read_as_a_tfds_data_set(digits_dir: str):
  config = {"kind": "tfds", "name": f"{sources.DIGITS_DATASET_NAME}/{DIGITS_SIZE}px",
            "data_dir": digits_dir}
  source = sources.get_source(config, "validation[:5]")
  assert len(source) == 5 and source.num_classes == 10


@pytest.mark.parametrize("size", [4, 2000, 32.5, True])
def test_bad_digits_size_raises(size, tmp_path: Path):
  with pytest.raises(DataError, match="digits_size"):
    sources.get_source({"kind": "digits", "data_dir": os.fspath(tmp_path), "digits_size": size},
                       "train")


# --------------------------------------------------------------------------- #
# Labels in the loaders
# --------------------------------------------------------------------------- #


def _whole_image_config(config):
  """No crop, no flip: training images are the stored images, so they can be identified."""
  config.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
  return config


def test_train_labels_travel_with_their_digits(digits_dir: str):
  source = sources.get_source(_digits_config(digits_dir), "train")
  label_of = {_decode(source[i]["image"]).tobytes(): source[i]["label"] for i in range(len(source))}
  loader = pipeline.make_train_loader(_whole_image_config(_digits_config(digits_dir)),
                                      pipeline.DataSpec.single_view(DIGITS_SIZE, labels=True),
                                      global_batch_size=2, seed=0, worker_count=0, num_epochs=1)
  assert loader.num_classes == 10 and loader.with_labels
  seen = []
  for batch in loader:
    assert set(batch) == {"image", "label"} and batch["label"].dtype == np.int32
    for image, label in zip(batch["image"], batch["label"]):
      assert label_of[image.tobytes()] == label
      seen.append(int(label))
  assert len(seen) == len(source)
  assert np.bincount(seen).tolist() == np.bincount(list(label_of.values())).tolist()


def test_eval_labels_are_the_sources_in_order(digits_dir: str):
  config = _digits_config(digits_dir)
  source = sources.get_source(config, "validation")
  loader = pipeline.make_eval_loader(config, global_batch_size=64, image_size=DIGITS_SIZE,
                                     worker_count=0, with_labels=True)
  assert loader.num_classes == 10
  batches = list(loader)
  assert all(set(b) == {"image", "label", "mask"} for b in batches)
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert labels.tolist() == [source[i]["label"] for i in range(len(source))]
  assert not batches[-1]["label"][~batches[-1]["mask"]].any()  # Padding: label 0.


def _write_folder(root: Path, split: str, classes: dict[str, int]) -> None:
  rng = np.random.default_rng(len(split))
  for name, count in classes.items():
    for index in range(count):
      path = root / split / name / f"{index}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (10, 10, 3), np.uint8)).save(path)


def _folder_config(root: Path, **overrides):
  config = pipeline.default_data_config()
  config.update(kind="image_folder", data_dir=os.fspath(root), eval_split="val", **overrides)
  return config


def test_image_folder_labels_are_sorted_class_indices(tmp_path: Path):
  classes = {"cat": 3, "ant": 2, "zebra": 4}
  _write_folder(tmp_path, "train", classes)
  _write_folder(tmp_path, "val", classes)
  expected = {}
  for label, name in enumerate(sorted(classes)):
    for path in (tmp_path / "train" / name).iterdir():
      expected[np.asarray(Image.open(path)).tobytes()] = label
  config = _whole_image_config(_folder_config(tmp_path))
  loader = pipeline.make_train_loader(config, pipeline.DataSpec.single_view(10, labels=True),
                                      global_batch_size=3, seed=1, worker_count=0, num_epochs=1)
  assert loader.num_classes == 3
  got = {}
  for batch in loader:
    for image, label in zip(batch["image"], batch["label"]):
      got[image.tobytes()] = int(label)
  assert got == {k: v for k, v in expected.items() if k in got} and len(got) == 9
  eval_loader = pipeline.make_eval_loader(config, global_batch_size=4, image_size=10,
                                          worker_count=0, with_labels=True)
  eval_labels = [int(l) for b in eval_loader for l, m in zip(b["label"], b["mask"]) if m]
  assert eval_labels == [0, 0, 1, 1, 1, 2, 2, 2, 2]  # ant, cat, zebra in file order.


def test_image_folder_eval_with_other_classes_is_refused(tmp_path: Path):
  _write_folder(tmp_path, "train", {"ant": 2, "bee": 2, "cat": 2})
  _write_folder(tmp_path, "val", {"ant": 1, "cat": 1})
  config = _folder_config(tmp_path)
  with pytest.raises(DataError, match="labels would disagree") as info:
    pipeline.make_eval_loader(config, global_batch_size=2, image_size=8, worker_count=0,
                              with_labels=True)
  assert "bee" in str(info.value) and "\n" not in str(info.value)
  pipeline.make_eval_loader(config, global_batch_size=2, image_size=8, worker_count=0)  # No labels.
  (tmp_path / "val" / "bee").mkdir()  # An empty class folder is enough.
  pipeline.make_eval_loader(config, global_batch_size=2, image_size=8, worker_count=0,
                            with_labels=True)


def test_unlabelled_source_asked_for_labels_raises(demo_dir: str):
  config = pipeline.default_data_config()
  config.update(kind="tfds", name=sources.DEMO_DATASET_NAME, data_dir=demo_dir, label_key=None)
  loader = pipeline.make_train_loader(config, pipeline.DataSpec.single_view(16),
                                      global_batch_size=4, seed=0, worker_count=0)
  assert loader.num_classes is None and set(next(iter(loader))) == {"image"}
  for make in (lambda: pipeline.make_train_loader(config,
                                                  pipeline.DataSpec.single_view(16, labels=True),
                                                  global_batch_size=4, seed=0, worker_count=0),
               lambda: pipeline.make_eval_loader(config, global_batch_size=4, image_size=16,
                                                 worker_count=0, with_labels=True)):
    with pytest.raises(DataError, match="has none") as info:
      make()
    assert "label_key" in str(info.value)


def test_demo_photo_index_is_the_label(demo_dir: str):
  config = pipeline.default_data_config()
  config.data_dir = demo_dir
  loader = pipeline.make_eval_loader(config, global_batch_size=20, image_size=16, worker_count=0,
                                     with_labels=True)
  assert loader.num_classes == len(sources.DEMO_CLASSES)
  labels = np.concatenate([b["label"][b["mask"]] for b in loader])
  source = sources.get_source(config, "validation")
  assert labels.tolist() == [source[i]["label"] for i in range(len(source))]


# --------------------------------------------------------------------------- #
# Pre-training batches are unchanged; augmentation in the loader
# --------------------------------------------------------------------------- #


def _first_batches(config, seed: int, count: int = 2, labels: bool = False):
  spec = pipeline.DataSpec.single_view(DIGITS_SIZE, labels=labels, augment=True)
  loader = pipeline.make_train_loader(config, spec, global_batch_size=16, seed=seed,
                                      worker_count=0)
  iterator = iter(loader)
  return [next(iterator) for _ in range(count)]


def test_pretraining_batches_have_images_only_and_labels_add_nothing_else(digits_dir: str):
  config = _digits_config(digits_dir)
  plain = _first_batches(config, seed=3)
  labelled = _first_batches(config, seed=3, labels=True)
  for a, b in zip(plain, labelled):
    assert set(a) == {"image"} and set(b) == {"image", "label"}
    np.testing.assert_array_equal(a["image"], b["image"])  # Same images, same order.
  eval_batch = next(iter(pipeline.make_eval_loader(config, global_batch_size=8,
                                                   image_size=DIGITS_SIZE, worker_count=0)))
  assert set(eval_batch) == {"image", "mask"}


def test_randaugment_in_the_loader(digits_dir: str):
  plain_config = _digits_config(digits_dir)
  augmented_config = _digits_config(digits_dir, randaug_magnitude=9.0, randaug_mstd=0.5)
  plain = np.concatenate([b["image"] for b in _first_batches(plain_config, seed=7, count=4)])
  augmented = np.concatenate([b["image"] for b in _first_batches(augmented_config, seed=7,
                                                                 count=4)])
  again = np.concatenate([b["image"] for b in _first_batches(augmented_config, seed=7, count=4)])
  other = np.concatenate([b["image"] for b in _first_batches(augmented_config, seed=8, count=4)])
  np.testing.assert_array_equal(augmented, again)  # Same seed, same batches.
  assert not np.array_equal(augmented, other)
  # The crop is drawn first from the same per-record generator, so an image both of
  # whose ops were skipped (probability 1/4) is exactly the un-augmented crop.
  unchanged = np.mean([np.array_equal(a, p) for a, p in zip(augmented, plain)])
  assert 0.08 <= unchanged <= 0.45, unchanged
  assert augmented.shape == plain.shape and augmented.dtype == np.uint8


def test_augmented_records_do_not_depend_on_the_workers(digits_dir: str):
  """Each record's crop and RandAugment come from its own generator: 2 workers, same records."""
  config = _digits_config(digits_dir, split="validation", randaug_magnitude=9.0,
                          randaug_mstd=0.5, color_jitter=0.3, force_color_jitter=True)

  def epoch(worker_count: int) -> list[tuple[bytes, int]]:
    spec = pipeline.DataSpec.single_view(DIGITS_SIZE, labels=True, augment=True)
    loader = pipeline.make_train_loader(config, spec, global_batch_size=5, seed=11,
                                        worker_count=worker_count, num_epochs=1)
    return sorted((image.tobytes(), int(label)) for batch in loader
                  for image, label in zip(batch["image"], batch["label"]))

  in_process = epoch(0)
  assert len(in_process) == DIGITS_SPLITS["validation"]
  with_workers = epoch(2)
  # Each worker batches its own share (178 and 177 records) and drops its remainder.
  assert len(with_workers) == 350 and set(with_workers) <= set(in_process)
