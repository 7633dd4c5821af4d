"""Initialising a fine-tuning encoder from pre-trained weights: what is loaded, what is
fresh, position-embedding resizing against PyTorch, and mismatches."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax.convert import Converted, arch_from_config, content_hash
from mim_jax.convert.pretrained import init_encoder_from, resize_position_embedding
from mim_jax.errors import CheckpointMismatchError
from mim_jax.models import posembed
from mim_jax.models.vit import VisionTransformer
from mim_jax.tasks.registry import build_task
from mim_jax.trainer.tree import flatten_with_names


def pretrained_source(config):
  params = jax.tree.map(np.asarray, build_task(config).init_params(jax.random.PRNGKey(3)))
  return Converted(params=params, arch=arch_from_config(config.to_dict(), source="test"),
                   sha256=content_hash(params), path="pretrain-run")


def fresh_finetune_params(image_size=32, width=32, depth=2, num_classes=5):
  model = VisionTransformer(patch_size=8, width=width, depth=depth, num_heads=4,
                            posemb="learn", pool="gap", num_classes=num_classes)
  images = np.zeros((1, image_size, image_size, 3), np.float32)
  return jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), images)["params"])


def test_every_encoder_leaf_loaded_by_value_only_head_and_fc_norm_fresh():
  source = pretrained_source(tiny_config())
  fresh = fresh_finetune_params()
  params, report = init_encoder_from(fresh, source)
  got, pre, new = (flatten_with_names(t) for t in (params, source.params["encoder"], fresh))
  assert sorted(report.fresh) == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
  for name in report.fresh:
    np.testing.assert_array_equal(got[name], new[name])
  for name in got:
    if name in report.fresh:
      continue
    expected = (posembed.sincos_2d(32, 4, cls_token=True)[None] if name == "pos_embed"
                else pre[name])
    np.testing.assert_array_equal(got[name], expected, err_msg=name)
  assert set(got) == set(new)
  assert "decoder (all leaves)" in report.dropped and "norm/scale" in report.dropped


def test_layer_reservation_keeps_the_first_blocks_only():
  source = pretrained_source(tiny_config())
  fresh = fresh_finetune_params()
  params, report = init_encoder_from(fresh, source, keep_blocks=1)
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"],
                                source.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"],
                                fresh["blocks_1"]["attn"]["qkv"]["kernel"])
  assert all(("blocks_1/" in name) == ("keep_blocks" in name) for name in report.fresh
             if not name.startswith(("head", "fc_norm")))


def test_d2mae_extra_block_and_mappings_are_dropped(tmp_path):
  from conftest import make_teacher, tiny_distill_config
  config = tiny_distill_config(make_teacher(tmp_path / "t.npz"))
  params, report = init_encoder_from(fresh_finetune_params(), pretrained_source(config))
  assert "blocks_2" not in params
  assert any("attention-only" in item for item in report.dropped)
  assert "distill (all leaves)" in report.dropped


def test_resolution_change_resizes_position_embedding_like_torch():
  torch = pytest.importorskip("torch")
  table = np.random.RandomState(0).standard_normal((1, 1 + 7 * 7, 16)).astype(np.float32)
  ours = resize_position_embedding(table, 10)
  grid = torch.from_numpy(table[:, 1:]).reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
  theirs = torch.nn.functional.interpolate(grid, size=(10, 10), mode="bicubic",
                                           align_corners=False)
  theirs = theirs.permute(0, 2, 3, 1).reshape(1, 100, 16).numpy()
  np.testing.assert_allclose(ours[:, 1:], theirs, atol=1e-5)
  np.testing.assert_array_equal(ours[:, :1], table[:, :1])
  # And a whole fine-tuning init at another image size goes through it.
  source = pretrained_source(tiny_config())
  params, report = init_encoder_from(fresh_finetune_params(image_size=48), source)
  assert params["pos_embed"].shape == (1, 1 + 36, 32) and report.resized


def test_shapes_that_do_not_fit_are_an_error_listing_the_leaves():
  source = pretrained_source(tiny_config())
  with pytest.raises(CheckpointMismatchError,
                     match=r"blocks_0/attn/qkv/kernel: source \(32, 96\) vs model \(48, 144\)"):
    init_encoder_from(fresh_finetune_params(width=48), source)
  with pytest.raises(CheckpointMismatchError, match=r"blocks_2/.*missing from the source"):
    init_encoder_from(fresh_finetune_params(depth=3), source)


@pytest.mark.parametrize("old_grid, new_grid", [(8, 4), (12, 14), (4, 16)])
def test_relative_position_bias_resizes_as_timm(old_grid, new_grid):
  torch = pytest.importorskip("torch")
  from timm.layers import resize_rel_pos_bias_table  # pylint: disable=import-outside-toplevel
  from mim_jax.convert.pretrained import resize_relative_position_bias  # pylint: disable=C0415
  old_side, new_side = 2 * old_grid - 1, 2 * new_grid - 1
  table = np.random.RandomState(0).randn(old_side**2 + 3, 6).astype(np.float32)
  ours = resize_relative_position_bias(table, new_grid)
  theirs = resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=(new_grid,) * 2,
                                     new_bias_shape=(new_side**2 + 3, 6)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  np.testing.assert_array_equal(ours[-3:], table[-3:])  # the cls entries are kept
