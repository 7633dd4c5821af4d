"""Mixed precision, rematerialisation and the scan over blocks.

Tolerances: bfloat16 compute vs float32 on a fixed batch, relative 2e-2 on every
loss term (bfloat16 keeps 8 mantissa bits, ~4e-3 relative per rounding) and 0.1
absolute on the unit-scale final-norm tokens. Scanned vs unrolled: the same math
compiled as a loop instead of straight-line code, which XLA fuses differently:
agreement to float32 rounding (rtol 1e-5, atol 1e-5 x the leaf's largest
magnitude), not bit for bit; remat is checked inside the same comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config, tiny_distill_config
from mim_jax import config_defaults
from mim_jax.convert import save_converted
from mim_jax.errors import ConfigError
from mim_jax.models import scan
from mim_jax.models.vit import SCANNED_BLOCKS, VisionTransformer, layer_norm
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop
from mim_jax.trainer.tree import flatten_with_names

SMALL = dict(patch_size=8, width=32, depth=3, num_heads=4)
IMAGES = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
SCAN_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(name="teacher_path", scope="module")
def teacher_path_fixture(tmp_path_factory):
  """`conftest.make_teacher`'s architecture, with weights drawn without compiling an init."""
  arch = dict(patch_size=8, image_size=32, width=48, depth=3, num_heads=6, source="test")
  model = VisionTransformer(**{k: arch[k] for k in ("patch_size", "width", "depth",
                                                    "num_heads")})
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
  save_converted(path, {"encoder": random_params(model.init, IMAGES, seed=1)}, arch)
  return path


def random_params(init_fn, *args, seed=0):
  """Params of `init_fn`'s shapes, drawn at random without compiling the init: kernels
  ~ N(0, 1/fan_in), LayerNorm scales ~ 1, everything else ~ N(0, 0.05^2)."""
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0), *args)
  shapes = shapes.get("params", shapes)
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if "kernel" in name:  # Dense (in, out), Conv (p, p, 3, out): fan_in = all but the last
      return noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
    return np.float32(1.0 if "scale" in name else 0.0) + np.float32(0.05) * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


def run_jitted(fn, *args):
  """jit(fn)(*args), compiled with LLVM at -O0 on CPU: 2-3x faster compiles of these small
  programs (both sides of every comparison are compiled the same way)."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(*args).compile(options)(*args)


def assert_trees_close(actual, expected, rtol, atol):
  """Leaf by leaf; `atol` is relative to the leaf's largest magnitude (at least 1)."""
  actual, expected = flatten_with_names(actual), flatten_with_names(expected)
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    value = np.asarray(value, np.float32)
    scale = max(1.0, float(np.abs(value).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual[name], np.float32), value, rtol=rtol,
                               atol=atol * scale, err_msg=name)


def all_fp32(tree):
  return all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Layout conversion
# ----------------------------------------------------------------------------
def test_stack_unstack_round_trip_is_exact_and_matches_the_scanned_model():
  model = VisionTransformer(**SMALL, extra_attention_block=True)
  params = random_params(model.init, IMAGES)
  stacked = scan.stack_blocks(params, 3)
  assert "blocks_0" not in stacked and "blocks_3" in stacked  # the extra block stays out
  assert stacked[SCANNED_BLOCKS]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
  np.testing.assert_array_equal(stacked[SCANNED_BLOCKS]["mlp"]["fc1"]["bias"][1],
                                params["blocks_1"]["mlp"]["fc1"]["bias"])
  back = scan.unstack_blocks(stacked, 3)
  flat, flat_back = flatten_with_names(params), flatten_with_names(back)
  assert sorted(flat) == sorted(flat_back)
  for name, value in flat.items():
    np.testing.assert_array_equal(flat_back[name], value, err_msg=name)
  # The stacked tree is exactly what the scanned model itself creates, and its
  # unscanned twin (what the tasks initialise with) creates the per-block tree.
  scanned = model.clone(scan_blocks=True)
  wanted = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), IMAGES)["params"]
  assert jax.tree.map(np.shape, wanted) == jax.tree.map(np.shape, stacked)
  twin = jax.eval_shape(scan.unscanned(scanned).init, jax.random.PRNGKey(0), IMAGES)["params"]
  assert jax.tree.map(np.shape, twin) == jax.tree.map(np.shape, params)
  assert scan.apply_layout(params, model) is params
  with pytest.raises(ValueError, match="missing"):
    scan.stack_blocks(params, 5)
  with pytest.raises(ValueError, match="leading sizes"):
    scan.unstack_blocks(stacked, 2)


# ----------------------------------------------------------------------------
# Scanned == unrolled; remat changes nothing
# ----------------------------------------------------------------------------
def outputs_and_grads(model, params, **kwargs):
  """Forward outputs and d(sum of sin(every output))/d(params), in the model's layout."""
  def total(p):
    out = model.apply({"params": p}, IMAGES, **kwargs,
                      rngs={"dropout": jax.random.PRNGKey(5)})
    return sum(jnp.sum(jnp.sin(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(out)), out
  (_, out), grads = run_jitted(jax.value_and_grad(total, has_aux=True), params)
  return out, grads


def uses_remat(model, params, **kwargs):
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, IMAGES, **kwargs))(params)
  return "remat" in str(jaxpr)


def test_scanned_encoder_matches_unrolled_outputs_captures_and_gradients():
  # Unrolled without remat vs scanned with remat: both switches against one reference.
  model = VisionTransformer(**SMALL, extra_attention_block=True)
  scanned = model.clone(scan_blocks=True, remat="block_dots")
  params = random_params(model.init, IMAGES)
  stacked = scan.stack_blocks(params, 3)
  ids_keep = np.array([[3, 0, 9, 14, 5], [15, 2, 7, 1, 8]])
  kwargs = dict(ids_keep=ids_keep, capture_layers=(0, 1, 2, 3, 4), latent_layer=2)
  assert uses_remat(scanned, stacked, **kwargs) and not uses_remat(model, params, **kwargs)
  out, grads = outputs_and_grads(model, params, **kwargs)
  out_scanned, grads_scanned = outputs_and_grads(scanned, stacked, **kwargs)
  assert set(out_scanned["attn_logits"]) == {1, 2, 3, 4}
  assert set(out_scanned["hidden"]) == {0, 1, 2, 3}
  assert_trees_close(out_scanned, out, **SCAN_TOL)
  assert_trees_close(scan.unstack_blocks(grads_scanned, 3), grads, **SCAN_TOL)


def test_scanned_classifier_with_stochastic_depth_matches_unrolled_with_remat():
  model = VisionTransformer(**SMALL, posemb="learn", pool="gap", num_classes=5,
                            drop_path_rate=0.5, remat="block")
  scanned = model.clone(scan_blocks=True, remat="none")
  params = random_params(model.init, IMAGES)
  assert uses_remat(model, params)
  out, grads = outputs_and_grads(model, params, train=True)
  out_scanned, grads_scanned = outputs_and_grads(scanned, scan.stack_blocks(params, 3),
                                                 train=True)
  # Block i's drop-path key is fold_in(rng, i) either way: the same paths are dropped.
  assert_trees_close(out_scanned, out, **SCAN_TOL)
  assert_trees_close(scan.unstack_blocks(grads_scanned, 3), grads, **SCAN_TOL)
  evaluated = run_jitted(lambda p: model.apply({"params": p}, IMAGES)["logits"], params)
  assert not np.allclose(out["logits"], evaluated, atol=1e-3)  # it did drop


# ----------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_statistics_are_float32_and_two_pass(dtype):
  # A large per-token mean: E[x^2] - E[x]^2 (error 0.2 here) or bfloat16 sums would fail.
  offset = 1e3 if dtype == "float32" else 64.0
  rng = np.random.RandomState(0)
  x = jnp.asarray(offset + rng.standard_normal((4, 32)), dtype)
  values = np.asarray(x, np.float64)
  expected = (values - values.mean(-1, keepdims=True)) / np.sqrt(
      values.var(-1, keepdims=True) + 1e-6)
  norm = layer_norm("norm", jnp.dtype(dtype))
  out = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  assert out.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected,
                             atol=1e-3 if dtype == "float32" else 3e-2)


def task_pair(config, **bf16_distill):
  """The same task in float32 and in bfloat16 (params identical: they are float32)."""
  fp32 = build_task(config)
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  for key, value in bf16_distill.items():
    config.distill[key] = value
  return fp32, build_task(config)


def batch_of(task, seed=0):
  rng = np.random.RandomState(seed)
  size = task.config.image_size
  return {"image": rng.randint(0, 256, (8, size, size, 3)).astype(np.uint8)}


def test_bf16_mae_matches_fp32_and_keeps_params_loss_and_grads_fp32():
  fp32, bf16 = task_pair(tiny_config())
  assert all_fp32(jax.eval_shape(bf16.init_params, jax.random.PRNGKey(0)))
  params = random_params(bf16.init_params)
  batch, rng = batch_of(fp32), jax.random.PRNGKey(1)
  loss32, _ = run_jitted(fp32.loss_fn, params, {}, {}, batch, rng)
  (loss16, (terms16, _)), grads16 = run_jitted(jax.value_and_grad(bf16.loss_fn, has_aux=True),
                                          params, {}, {}, batch, rng)
  assert loss16.dtype == jnp.float32 and all_fp32(terms16) and all_fp32(grads16)
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  assert loss16 != loss32  # bfloat16 really ran

  images = jnp.asarray(batch["image"][:4], jnp.float32) / 255.0
  encode = lambda p, x: [task.model.encoder.apply({"params": p}, x, capture_layers=(1,))
                         for task in (fp32, bf16)]
  out32, out16 = run_jitted(encode, params["encoder"], images)
  assert out16["tokens"].dtype == jnp.bfloat16
  assert out16["attn_logits"][1].dtype == jnp.float32  # q k^T accumulates in float32
  np.testing.assert_allclose(np.asarray(out16["tokens"], np.float32), out32["tokens"], atol=0.1)
  np.testing.assert_allclose(out16["attn_logits"][1], out32["attn_logits"][1], atol=0.1)


def test_bf16_d2mae_terms_match_fp32_with_a_separate_teacher_dtype(teacher_path):
  fp32, bf16 = task_pair(tiny_distill_config(teacher_path), teacher_dtype="float32")
  assert bf16.distiller.teacher.dtype == jnp.float32
  assert bf16.model.encoder.dtype == jnp.bfloat16
  assert bf16.model.decoder.dtype == jnp.bfloat16  # mae.decoder.dtype unset: model.dtype
  params = random_params(fp32.init_params)
  frozen, _ = fp32.load_frozen()
  batch, rng = batch_of(fp32), jax.random.PRNGKey(1)
  loss32, (terms32, _) = run_jitted(fp32.loss_fn, params, {}, frozen, batch, rng)
  loss16, (terms16, _) = run_jitted(bf16.loss_fn, params, {}, frozen, batch, rng)
  assert set(terms16) == {"loss_rec", "loss_attn"}
  assert loss16.dtype == jnp.float32 and all_fp32(terms16)
  for name in terms32:
    np.testing.assert_allclose(terms16[name], terms32[name], rtol=2e-2, err_msg=name)
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


# ----------------------------------------------------------------------------
# A whole training step: scan on/off, one stable layout
# ----------------------------------------------------------------------------
def test_d2mae_train_step_with_scan_and_remat_equals_the_unrolled_step(teacher_path):
  config = tiny_distill_config(teacher_path)
  config.model.depth = 3
  config.distill.attn_pairs = ((4, 3),)
  config.mae.decoder_layer = 2
  plain = build_task(config)
  config = config.copy_and_resolve_references()
  config.model.update(scan_blocks=True, remat="block")
  config.distill.teacher_scan_blocks = True
  scanned = build_task(config)
  assert scanned.model.encoder.scan_blocks and scanned.distiller.teacher.scan_blocks

  # The state (what checkpoints hold) has the per-block layout either way.
  shapes = jax.eval_shape(plain.init_params, jax.random.PRNGKey(0))
  assert jax.eval_shape(scanned.init_params, jax.random.PRNGKey(0)) == shapes
  frozen, _ = scanned.load_frozen()
  assert "blocks_2" in frozen["teacher"] and SCANNED_BLOCKS not in frozen["teacher"]

  tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
  params = random_params(plain.init_params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(3)}
  batch = batch_of(plain)
  (new, metrics), (new_scanned, metrics_scanned) = [
      run_jitted(loop.make_train_step(task, tx, schedule), state, frozen, batch)
      for task in (plain, scanned)]
  assert metrics["loss_attn"] > 0
  assert_trees_close(metrics_scanned, metrics, **SCAN_TOL)
  assert_trees_close(new_scanned["params"], new["params"], **SCAN_TOL)
  assert not np.allclose(new["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                         params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])


# ----------------------------------------------------------------------------
# Fused attention where nobody reads the logits
# ----------------------------------------------------------------------------
def test_fused_attention_runs_only_where_logits_are_unread_and_changes_nothing(
    teacher_path, monkeypatch):
  config = tiny_distill_config(teacher_path)
  config.model.depth = 3
  config.distill.attn_pairs = ((4, 3),)  # the student's extra block <- teacher block 3
  config.mae.decoder_layer = 2
  explicit = build_task(config)
  config = config.copy_and_resolve_references()
  config.model.attention_impl = "xla"
  fused = build_task(config)
  config = config.copy_and_resolve_references()
  config.model.scan_blocks = config.distill.teacher_scan_blocks = True
  fused_scanned = build_task(config)

  fused_calls = []
  dot_product_attention = jax.nn.dot_product_attention
  def spy(query, *args, **kwargs):
    fused_calls.append(query.shape)
    return dot_product_attention(query, *args, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)

  tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
  params = random_params(explicit.init_params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(3)}
  frozen, _ = explicit.load_frozen()
  batch = batch_of(explicit)
  step = lambda task: run_jitted(loop.make_train_step(task, tx, schedule), state,
                                 frozen, batch)
  new, metrics = step(explicit)
  assert not fused_calls
  new_fused, metrics_fused = step(fused)
  # (tokens, heads) of each traced call: student blocks 1-3 (only the extra block 4 is
  # distilled; 4 heads), teacher blocks 1-2 (block 3 is distilled; 6 heads), the
  # decoder's block (1 + 16 tokens, 2 heads).
  kept = 1 + 4  # cls + 25% of the 4x4 patches
  calls = lambda: sorted(shape[1:3] for shape in fused_calls)
  assert calls() == [(kept, 4)] * 3 + [(kept, 6)] * 2 + [(17, 2)]
  fused_calls.clear()
  # Scanned: the student's scan body (no logits captured in 1..3) and the decoder; the
  # teacher's scan captures block 3, so all its blocks stay explicit.
  new_scanned, metrics_scanned = step(fused_scanned)
  assert set(calls()) == {(kept, 4), (17, 2)}
  assert metrics["loss_attn"] > 0
  for other_metrics, other in ((metrics_fused, new_fused), (metrics_scanned, new_scanned)):
    assert_trees_close(other_metrics, metrics, **SCAN_TOL)
    assert_trees_close(other["params"], new["params"], **SCAN_TOL)


# ----------------------------------------------------------------------------
# Bad settings
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("model.dtype", "float16", "model.dtype='float16' is not a compute dtype"),
    ("model.remat", "full", "model.remat='full' is unknown"),
    ("mae.decoder.dtype", "int8", "mae.decoder.dtype='int8'"),
    ("model.scan_blocks", 1, "model.scan_blocks=1 must be True or False"),
    ("model.attention_impl", "flash", "model.attention_impl='flash' is unknown"),
    pytest.param("model.attention_impl", "cudnn", "'cudnn' needs a GPU, but JAX runs on 'cpu'",
                 marks=pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU message")),
])
def test_bad_precision_and_memory_settings_are_config_errors(key, value, message):
  config = tiny_config()
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    build_task(config)


def test_teacher_dtype_is_checked_and_linear_probe_has_no_remat(teacher_path):
  config = tiny_distill_config(teacher_path)
  config.distill.teacher_dtype = "half"
  with pytest.raises(ConfigError, match="distill.teacher_dtype='half'"):
    build_task(config)
  probe = config_defaults.linear_probe_config()
  assert "remat" not in probe.model and probe.model.scan_blocks is False
  assert config_defaults.finetune_config().model.remat == "none"
