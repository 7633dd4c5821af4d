"""Tests of mim_jax.models.regnet and mim_jax.convert.regnet_torch against timm's RegNet.

timm (importorskip) is the reference: its models with random weights, every
BatchNorm's statistics and affine perturbed (timm zero-initialises each block's
last BN scale, which would leave the residual branches untested), in eval mode.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mim_jax.convert import regnet_torch
from mim_jax.errors import UserError
from mim_jax.models import regnet

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

ATOL = 1e-4


def _timm_model(name: str, seed: int = 0):
  """timm's `name`, random weights, non-trivial BatchNorm and head, in eval mode."""
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.2, 1.0, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
        module.running_mean.normal_(0.0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
    model.head.fc.weight.normal_(0.0, 0.05, generator=generator)
    model.head.fc.bias.normal_(0.0, 0.5, generator=generator)
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _logits(model, name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ours, timm's) logits of `images` with the timm model's weights imported."""
  variables = regnet_torch.params_from_timm_state_dict(_state_dict(model), name)
  logits = jax.jit(regnet.regnet(name).apply)(variables, images)
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert logits.dtype == np.float32
  return np.asarray(logits), expected


def _assert_logits_match(ours: np.ndarray, theirs: np.ndarray) -> None:
  assert ours.shape == theirs.shape
  assert np.abs(theirs).max() > 1.0  # logits of a size where 1e-4 means something
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def small():
  """regnety_002 (3M params): a RegNet-Y of the same design as regnety_160."""
  return _timm_model("regnety_002")


def test_stage_specs_match_timm():
  """Widths, depths and group sizes of every named config are timm's."""
  from timm.models import regnet as timm_regnet  # pylint: disable=import-outside-toplevel
  for name, config in regnet.CONFIGS.items():
    timm_config = timm_regnet.model_cfgs[name]
    for field in ("w0", "wa", "wm", "depth", "group_size", "se_ratio", "bottle_ratio",
                  "group_min_ratio", "stem_width"):
      assert getattr(config, field) == getattr(timm_config, field), (name, field)
    # What this module hard-codes (conv1x1 shortcut, ReLU after the sum, BN, ReLU).
    assert (timm_config.downsample, timm_config.linear_out, timm_config.preact,
            timm_config.num_features, timm_config.act_layer,
            timm_config.norm_layer) == ("conv1x1", False, False, 0, "relu", "batchnorm"), name
    # A method that reads nothing of its instance.
    stages, _ = timm_regnet.RegNet._get_stage_args(  # pylint: disable=protected-access
        None, timm_config)
    expected = [(s["out_chs"], s["depth"], s["group_size"], s["stride"], s["dilation"])
                for s in stages]
    ours = [(s.width, s.depth, s.group_size, 2, 1) for s in regnet.stage_specs(config)]
    assert ours == expected, name


def test_small_regnety_logits_match_timm(small):
  images = np.random.default_rng(0).standard_normal((3, 224, 224, 3)).astype(np.float32)
  ours, theirs = _logits(small, "regnety_002", images)
  assert ours.shape == (3, 1000)
  _assert_logits_match(ours, theirs)
  one = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
  ours, theirs = _logits(small, "regnety_002", one)
  assert ours.shape == (1, 1000)
  _assert_logits_match(ours, theirs)


def test_regnety_160_logits_match_timm():
  """DeiT's / MAE-Lite's teacher, 84M params: one batch of 2 images at 224 px."""
  images = np.random.default_rng(2).standard_normal((2, 224, 224, 3)).astype(np.float32)
  ours, theirs = _logits(_timm_model("regnety_160", seed=1), "regnety_160", images)
  assert ours.shape == (2, 1000)
  _assert_logits_match(ours, theirs)


# Four one-block stages of widths 8, 24, 40, 64: a custom config, cheap to compile.
TINY = dict(w0=8, wa=16, wm=1.5, depth=4, group_size=8, se_ratio=0.25, stem_width=8)


def test_custom_config_and_bfloat16_compute():
  from timm.models import regnet as timm_regnet  # pylint: disable=import-outside-toplevel
  config = regnet.RegNetConfig(**TINY)
  torch.manual_seed(0)
  model = timm_regnet.RegNet(timm_regnet.RegNetCfg(**TINY), num_classes=10).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.2, 1.0)
        module.running_var.uniform_(0.5, 2.0)
    model.head.fc.weight.normal_(0.0, 1.0)
  variables = regnet_torch.params_from_timm_state_dict(_state_dict(model), config,
                                                       num_classes=10)
  images = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  full = jax.jit(regnet.regnet(config, num_classes=10).apply)(variables, images)
  np.testing.assert_allclose(np.asarray(full), expected, rtol=0, atol=ATOL)
  half = jax.jit(regnet.regnet(config, num_classes=10, dtype=jax.numpy.bfloat16).apply)(
      variables, images)
  assert half.dtype == np.float32
  # bfloat16 keeps 8 bits of mantissa: a few percent of the logits' range.
  error = float(np.abs(np.asarray(half) - expected).max())
  assert 0 < error < 0.05 * float(np.abs(expected).max())


def test_round_trip_is_timm_state_dict(small):
  """Export gives timm's own keys, order and values; timm loads it strictly."""
  state_dict = _state_dict(small)
  variables = regnet_torch.params_from_timm_state_dict(state_dict, "regnety_002")
  exported = regnet_torch.timm_state_dict_from_params(variables, "regnety_002")
  assert list(exported) == list(state_dict)
  for key, value in state_dict.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  fresh = timm.create_model("regnety_002", pretrained=False)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_import_without_bn_counters(small):
  """num_batches_tracked (a training counter) is optional."""
  state_dict = {k: v for k, v in _state_dict(small).items()
                if not k.endswith("num_batches_tracked")}
  variables = regnet_torch.params_from_timm_state_dict(state_dict, "regnety_002")
  assert set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["batch_stats"]["s2"]["b1"]["conv2"]["bn"]["var"],
                                state_dict["s2.b1.conv2.bn.running_var"])


def _one_line_error(state_dict, arch="regnety_002", **kwargs) -> str:
  with pytest.raises(UserError) as error:
    regnet_torch.params_from_timm_state_dict(state_dict, arch, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_key_is_named(small):
  state_dict = _state_dict(small)
  del state_dict["s3.b2.se.fc1.bias"]
  message = _one_line_error(state_dict, source="teacher.pth")
  assert message.startswith("teacher.pth: the state_dict is not timm regnety_002")
  assert "missing keys: s3.b2.se.fc1.bias" in message and "unexpected" not in message


def test_wrong_shape_and_unexpected_key_are_named(small):
  state_dict = _state_dict(small)
  state_dict["s1.b1.conv2.conv.weight"] = np.zeros((24, 8, 1, 1), np.float32)
  state_dict["head_dist.weight"] = np.zeros((1000, 368), np.float32)
  message = _one_line_error(state_dict)
  assert "unexpected keys: head_dist.weight" in message
  assert "s1.b1.conv2.conv.weight (24, 8, 1, 1) != (24, 8, 3, 3)" in message


def test_wrong_architecture_and_classes(small):
  message = _one_line_error(_state_dict(small), arch="regnety_004")
  assert "missing keys" in message and "shape mismatches" in message
  message = _one_line_error(_state_dict(small), num_classes=10)
  assert "head.fc.weight (1000, 368) != (10, 368)" in message
  with pytest.raises(UserError, match="unknown RegNet architecture 'regnety_161'"):
    regnet.get_config("regnety_161")


def test_export_checks_the_variables(small):
  variables = regnet_torch.params_from_timm_state_dict(_state_dict(small), "regnety_002")
  del variables["batch_stats"]["stem"]
  with pytest.raises(UserError, match=r"missing variables: batch_stats/stem/bn/mean"):
    regnet_torch.timm_state_dict_from_params(variables, "regnety_002")
