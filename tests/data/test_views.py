"""The training loader builds the task's data spec: several views, worker-made fields, labels.

One view must give the batches of the single-crop transforms (`DecodeRandomResizedCrop`
then `Augment`) bit for bit; several views are crops of one decode drawn in a
fixed order from the record's generator, so batches are reproducible, resume
exactly and do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import io
import os

import grain
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import pipeline, samplers, sources, transforms, views
from mim_jax.data.sources import DataError
from mim_jax.data.spec import DataSpec, ViewSpec


@dataclasses.dataclass(frozen=True)
class RandomMask:
  """A worker field: a random boolean grid (as a block-wise mask generator would make)."""

  name: str
  shape: tuple[int, int] = (4, 4)

  def make(self, rng: np.random.Generator) -> np.ndarray:
    return rng.random(self.shape) < 0.5


# Two views of different sizes and scales (the second never flips) and a worker field.
TWO_VIEWS = DataSpec(views=(ViewSpec(32), ViewSpec(16, key="local", crop_scale=(0.05, 0.4),
                                                    flip=False)),
                     worker_fields=(RandomMask("mask"),), labels=True)


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory):
  path = tmp_path_factory.getbasetemp() / "mim_jax_demo_tfds"  # Shared with the other data tests.
  sources.build_demo_dataset(os.fspath(path))
  config = pipeline.default_data_config()
  config.data_dir = os.fspath(path)
  return config


def _batches(config, spec: DataSpec, count: int, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs = {"global_batch_size": 4, "seed": 0, "worker_count": 0, **kwargs}
  iterator = iter(pipeline.make_train_loader(config, spec, **kwargs))
  return [{key: np.array(value) for key, value in next(iterator).items()} for _ in range(count)]


def _assert_same(batches_a, batches_b) -> None:
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------- #
# One view: the single-crop pipeline, bit for bit
# --------------------------------------------------------------------------- #


def test_one_view_batches_are_the_single_crop_pipelines(demo_config):
  config = demo_config.copy_and_resolve_references()
  config.update(reduced_jpeg_decode=True, randaug_magnitude=9.0, randaug_mstd=0.5,
                color_jitter=0.3, force_color_jitter=True)
  ours = _batches(config, DataSpec.single_view(24, labels=True, augment=True), 3, seed=9)
  # The loader as it was before data specs: its transforms, composed by hand.
  source = sources.get_source(config, "train")
  reference = grain.DataLoader(
      data_source=source, sampler=samplers.stream_sampler(len(source), 9, None), worker_count=0,
      operations=[transforms.DecodeRandomResizedCrop(24, reduced_decode=True),
                  pipeline.train_augmentation(config),
                  transforms.SkipUndecodable(max_consecutive=4),
                  transforms.KeepFields(("image", "label")),
                  grain.transforms.Batch(4, drop_remainder=True)])
  iterator = iter(reference)
  _assert_same(ours, [next(iterator) for _ in range(3)])


def test_augmentation_applies_only_when_the_spec_asks(demo_config):
  config = demo_config.copy_and_resolve_references()
  config.randaug_magnitude = 9.0
  plain = _batches(demo_config, DataSpec.single_view(16), 1)
  unasked = _batches(config, DataSpec.single_view(16), 1)
  asked = _batches(config, DataSpec.single_view(16, augment=True), 1)
  _assert_same(unasked, plain)
  assert not np.array_equal(asked[0]["image"], plain[0]["image"])


# --------------------------------------------------------------------------- #
# Several views and a worker field
# --------------------------------------------------------------------------- #


def _gradient_png(height: int, width: int) -> bytes:
  y, x = np.mgrid[:height, :width]
  pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_views_are_crops_of_one_decode_drawn_in_order():
  data = _gradient_png(90, 120)
  decoded = Image.open(io.BytesIO(data)).convert("RGB")
  transform = views.train_transform(TWO_VIEWS, pipeline.default_data_config())
  for seed in range(6):
    out = transform.random_map({"image": data, "label": 3}, np.random.default_rng(seed))
    # Independently: view 0's box and flip, view 1's box (no flip), then the field.
    rng = np.random.default_rng(seed)
    expected = {}
    for key, size, scale, flip in (("image", 32, (0.2, 1.0), True),
                                   ("local", 16, (0.05, 0.4), False)):
      top, left, h, w = transforms.sample_crop_box(90, 120, scale, (3 / 4, 4 / 3), rng)
      crop = np.asarray(decoded.crop((left, top, left + w, top + h)).resize(
          (size, size), Image.Resampling.BICUBIC))
      expected[key] = crop[:, ::-1] if flip and rng.random() < 0.5 else crop
    expected["mask"] = rng.random((4, 4)) < 0.5
    assert out.keys() == {"image", "local", "mask", "label"} and out["label"] == 3
    for key, value in expected.items():
      np.testing.assert_array_equal(out[key], value)


def test_two_views_and_a_field_in_the_batch(demo_config):
  batches = _batches(demo_config, TWO_VIEWS, 2, global_batch_size=8, seed=1)
  for batch in batches:
    assert set(batch) == set(TWO_VIEWS.batch_keys) == {"image", "local", "mask", "label"}
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["local"].shape == (8, 16, 16, 3) and batch["local"].dtype == np.uint8
    assert batch["mask"].shape == (8, 4, 4) and batch["mask"].dtype == bool
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  # Fields differ between examples; the local views come from small crops: other pixels.
  assert len({mask.tobytes() for batch in batches for mask in batch["mask"]}) > 8
  assert batches[0]["local"].std() > 10
  _assert_same(_batches(demo_config, TWO_VIEWS, 2, global_batch_size=8, seed=1), batches)
  other = _batches(demo_config, TWO_VIEWS, 1, global_batch_size=8, seed=2)[0]
  for key in ("image", "local", "mask"):
    assert not np.array_equal(other[key], batches[0][key])


def test_two_views_resume_exactly(demo_config):
  def make():
    return pipeline.make_train_loader(demo_config, TWO_VIEWS, global_batch_size=4, seed=5,
                                      worker_count=0)

  def take(iterator, count):
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(count)]

  iterator = iter(make())
  first = take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = iter(make())
  resumed.set_state(state)
  _assert_same(take(resumed, 3), expected)
  assert not np.array_equal(first[0]["mask"], expected[0]["mask"])


def test_two_views_in_a_worker_process_are_the_in_process_ones(demo_config):
  # The transform and its field travel to the (spawned) worker by pickle.
  _assert_same(_batches(demo_config, TWO_VIEWS, 2, seed=4, worker_count=1),
               _batches(demo_config, TWO_VIEWS, 2, seed=4, worker_count=0))


def test_two_view_global_batches_do_not_depend_on_the_process_count(demo_config):
  one = _batches(demo_config, TWO_VIEWS, 2, global_batch_size=8, seed=3)
  halves = [_batches(demo_config, TWO_VIEWS, 2, global_batch_size=8, seed=3, process_index=p,
                     process_count=2) for p in range(2)]
  for step in range(2):
    _assert_same([{k: np.concatenate([halves[0][step][k], halves[1][step][k]])
                   for k in one[step]}], [one[step]])


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel

  buffer = io.BytesIO()
  Image.fromarray(skimage_data.astronaut()).resize((1024, 1024)).save(buffer, format="JPEG",
                                                                      quality=90)
  return buffer.getvalue()


def test_reduced_decode_keeps_every_view_at_its_size(big_jpeg: bytes,
                                                     monkeypatch: pytest.MonkeyPatch):
  calls = []
  original = transforms.resized_crop

  def spy(image, box, size, scale=1.0):
    calls.append((box, size, scale))
    return original(image, box, size, scale)

  monkeypatch.setattr(transforms, "resized_crop", spy)
  spec = DataSpec(views=(ViewSpec(64, crop_scale=(0.3, 1.0)),
                         ViewSpec(24, key="small", crop_scale=(0.02, 0.1))))
  config = pipeline.default_data_config()
  config.reduced_jpeg_decode = True
  transform = views.train_transform(spec, config)
  full = views.train_transform(spec, pipeline.default_data_config())
  scales = set()
  for seed in range(12):
    reduced = transform.random_map({"image": big_jpeg, "label": 0}, np.random.default_rng(seed))
    exact = full.random_map({"image": big_jpeg, "label": 0}, np.random.default_rng(seed))
    (box_a, _, scale), (box_b, _, scale_b) = calls[-4:-2]
    assert scale == scale_b and [c[0] for c in calls[-2:]] == [box_a, box_b]  # Same boxes.
    sides = [min(box_a[2:]) * scale / 64, min(box_b[2:]) * scale / 24]
    # Every view keeps >= its size per side; the next reduction would break one of them.
    assert min(sides) >= 1 and (scale == 1 / 8 or min(sides) / 2 < 1), (seed, scale, sides)
    scales.add(scale)
    for key in ("image", "small"):
      assert np.abs(reduced[key].astype(int) - exact[key]).mean() < 4
  assert len(scales) > 1  # The small view decides sometimes, the large one other times.


# --------------------------------------------------------------------------- #
# Bad specs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("view,match", [
    (ViewSpec(0), "View 'image' has size 0"),
    (ViewSpec(16, key="local", crop_scale=(0.5, 0.2)), "crop_scale .* of view 'local'"),
    (ViewSpec(16, crop_ratio=(0.0, 1.0)), "crop_ratio"),
])
def test_bad_view_is_one_line(demo_config, view: ViewSpec, match: str):
  with pytest.raises(DataError, match=match) as info:
    pipeline.make_train_loader(demo_config, DataSpec(views=(view,)), global_batch_size=4,
                               seed=0, worker_count=0)
  assert "\n" not in str(info.value)


class _Unpicklable:
  name = "lambda_field"

  def __init__(self):
    self.make = lambda rng: rng.random(2)


def test_worker_fields_are_checked_before_the_workers_start(demo_config):
  spec = DataSpec(views=(ViewSpec(8),), worker_fields=(_Unpicklable(),))
  with pytest.raises(TypeError, match="lambda_field.*cannot be pickled"):
    pipeline.make_train_loader(demo_config, spec, global_batch_size=4, seed=0, worker_count=2)
  assert _batches(demo_config, spec, 1)[0]["lambda_field"].shape == (4, 2)  # In-process: fine.
  with pytest.raises(TypeError, match="needs a str `name` and a `make"):
    pipeline.make_train_loader(demo_config, DataSpec(views=(ViewSpec(8),), worker_fields=(3,)),
                               global_batch_size=4, seed=0, worker_count=0)
