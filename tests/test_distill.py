"""D-MAE / D²-MAE: losses against independent references, gradient flow, the frozen
teacher, resume with the teacher hash, and bad input."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_teacher, tiny_distill_config
from mim_jax.errors import CheckpointMismatchError, ConfigError, UserError
from mim_jax.models import posembed
from mim_jax.objectives import distillation
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop, sharding
from mim_jax.trainer.tree import flatten_with_names


@pytest.fixture(name="teacher_path")
def teacher_path_fixture(tmp_path):
  return make_teacher(tmp_path / "teacher.npz")


def random_batch(task, batch_size=4, seed=0):
  rng = np.random.RandomState(seed)
  size = task.config.image_size
  images = rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)
  noise = rng.uniform(size=(batch_size, task.num_patches)).astype(np.float32)
  return images, noise


def perturbed_params(task, seed=0):
  """Init params plus noise on every leaf (so norms/biases/tokens are not 1/0)."""
  params = task.init_params(jax.random.PRNGKey(seed))
  rng = np.random.RandomState(seed + 100)
  return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                      .astype(np.float32), params)


# ----------------------------------------------------------------------------
# The objectives against numpy
# ----------------------------------------------------------------------------
def test_attention_loss_and_its_gradients_match_numpy():
  rng = np.random.RandomState(0)
  student = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
  teacher = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
  kernel = rng.standard_normal((3, 4)).astype(np.float32)
  # (M A_s)[b, i] = sum_j M[i, j] A_s[b, j] with M = kernel.T (h_t x h_s).
  mapped = np.stack([sum(kernel[j, i] * student[:, j] for j in range(3)) for i in range(4)], 1)
  diff = mapped - teacher
  expected = np.mean(diff**2)
  loss, (g_student, g_teacher, g_kernel) = jax.value_and_grad(
      distillation.attention_distillation_loss, argnums=(0, 1, 2))(student, teacher, kernel)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  scale = 2.0 / diff.size
  np.testing.assert_allclose(g_kernel, scale * np.einsum("biqk,bjqk->ji", diff, student),
                             rtol=1e-5)
  np.testing.assert_allclose(g_student, scale * np.einsum("biqk,ji->bjqk", diff, kernel),
                             rtol=1e-5, atol=1e-7)
  assert not np.any(g_teacher), "the teacher's logits must get no gradient"


def test_hidden_loss_matches_numpy():
  rng = np.random.RandomState(1)
  student = rng.standard_normal((2, 5, 6)).astype(np.float32)
  teacher = rng.standard_normal((2, 5, 8)).astype(np.float32)
  kernel = rng.standard_normal((6, 8)).astype(np.float32)
  expected = np.mean((student @ kernel - teacher)**2)
  loss, g_teacher = jax.value_and_grad(distillation.hidden_distillation_loss, argnums=1)(
      student, teacher, kernel)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert not np.any(g_teacher)


def test_mapping_init_is_pytorch_default_bound():
  kernel = np.asarray(distillation.mapping_init(jax.random.PRNGKey(0), (12, 12)))
  bound = 1 / np.sqrt(12)
  assert kernel.shape == (12, 12) and np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound  # uniform over the whole range


# ----------------------------------------------------------------------------
# The whole D²-MAE / D-MAE loss against a torch reference written from docs/methods.md
# ----------------------------------------------------------------------------
def torch_reference_loss(torch, params, teacher_params, images, noise, *, patch, mask_ratio,
                         student_heads, teacher_heads, student_depth, extra_block,
                         decoder_layer, decoder_heads, attn_pairs, hidden_pairs=(),
                         hidden_weight=1.0):
  """docs/methods.md §2-4 in float64 torch, reading mim_jax's param pytrees (Dense kernels are
  (in, out); the conv kernel (p, p, 3, d) is the linear map of a (row, col, channel)
  patch)."""
  f = torch.nn.functional

  def ln(x, p):
    return f.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], eps=1e-6)

  def dense(x, p):
    return x @ p["kernel"] + p["bias"]

  def attention_logits(x, p, heads):
    b, n, d = x.shape
    qkv = dense(x, p["qkv"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return qkv[0] @ qkv[1].transpose(-2, -1) * (d // heads)**-0.5, qkv[2]

  def block(x, p, heads):
    logits, v = attention_logits(ln(x, p["norm1"]), p["attn"], heads)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + dense(out, p["attn"]["proj"])
    h = dense(ln(x, p["norm2"]), p["mlp"]["fc1"])
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    return x + dense(h, p["mlp"]["fc2"]), logits

  b, size = images.shape[0], images.shape[1]
  grid = size // patch
  num_patches = grid * grid
  patches = images.reshape(b, grid, patch, grid, patch, 3).permute(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, num_patches, patch * patch * 3)
  keep = int(num_patches * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  ids_keep = ids_shuffle[:, :keep]
  mask = torch.ones(b, num_patches, dtype=torch.float64)
  mask[:, :keep] = 0
  mask = torch.gather(mask, 1, ids_restore)

  def encode(p, heads, depth, extra, latent_layer):
    """-> (latent, attention logits by layer, representations by layer)."""
    width = p["cls_token"].shape[-1]
    pos = torch.tensor(posembed.sincos_2d(width, grid, cls_token=True), dtype=torch.float64)
    kernel = p["patch_embed"]["proj"]["kernel"].reshape(-1, width)
    x = patches @ kernel + p["patch_embed"]["proj"]["bias"] + pos[1:]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, width))
    x = torch.cat([(p["cls_token"] + pos[:1]).expand(b, -1, -1), x], 1)
    logits, latent, hidden = {}, None, {0: x}
    for i in range(depth):
      x, logits[i + 1] = block(x, p[f"blocks_{i}"], heads)
      if i + 1 == latent_layer:
        latent = ln(x, p["norm"])
      # Layer k's representation: normalised by the next block's LN1, the last by the final norm.
      hidden[i + 1] = ln(x, p[f"blocks_{i + 1}"]["norm1"] if i + 1 < depth else p["norm"])
    if extra:
      logits[depth + 1], _ = attention_logits(ln(x, p[f"blocks_{depth}"]["norm1"]),
                                              p[f"blocks_{depth}"]["attn"], heads)
    return latent, logits, hidden

  latent, student_logits, student_hidden = encode(params["encoder"], student_heads,
                                                  student_depth, extra_block, decoder_layer)
  _, teacher_logits, teacher_hidden = encode(teacher_params, teacher_heads, len(
      [k for k in teacher_params if k.startswith("blocks_")]), False, None)

  dec = params["decoder"]
  x = dense(latent, dec["embed"])
  width = x.shape[-1]
  tokens = torch.cat([x[:, 1:], dec["mask_token"].expand(b, num_patches - keep, -1)], 1)
  tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, width))
  x = torch.cat([x[:, :1], tokens], 1)
  x = x + torch.tensor(posembed.sincos_2d(width, grid, cls_token=True), dtype=torch.float64)
  i = 0
  while f"blocks_{i}" in dec:
    x, _ = block(x, dec[f"blocks_{i}"], decoder_heads)
    i += 1
  pred = dense(ln(x, dec["norm"]), dec["pred"])[:, 1:]
  mean = patches.mean(-1, keepdim=True)
  var = patches.var(-1, keepdim=True)  # unbiased, PyTorch's default
  target = (patches - mean) / (var + 1e-6)**0.5
  loss_rec = (((pred - target)**2).mean(-1) * mask).sum() / mask.sum()
  loss_attn = 0
  for s, t in attn_pairs:
    kernel = params["distill"][f"attn_s{s}_t{t}"]["kernel"]  # (h_s, h_t) = conv weight.T
    mapped = torch.einsum("ij,bjqk->biqk", kernel.T, student_logits[s])
    loss_attn = loss_attn + ((mapped - teacher_logits[t].detach())**2).mean()
  loss_hidden = 0
  for s, t in hidden_pairs:
    kernel = params["distill"][f"hidden_s{s}_t{t}"]["kernel"]  # (d_s, d_t) = Linear weight.T
    loss_hidden = loss_hidden + ((student_hidden[s] @ kernel - teacher_hidden[t].detach())**2
                                 ).mean()
  return loss_rec + loss_attn + hidden_weight * loss_hidden, loss_rec, loss_attn, loss_hidden


@pytest.mark.parametrize("d2", [True, False], ids=["d2mae", "dmae"])
def test_distillation_loss_and_gradients_match_torch_reference(tmp_path, d2):
  torch = pytest.importorskip("torch")
  config = tiny_distill_config(make_teacher(tmp_path / "teacher.npz"), d2=d2)
  config.model.depth = 3  # D²-MAE: decoder on block 1, blocks 2-3 + extra block 4
  config.distill.attn_pairs = ((4, 3),) if d2 else ((3, 3),)
  if not d2:  # D-MAE with the paper's ablation: hidden distillation at two layer pairs
    config.distill.hidden_pairs = ((2, 2), (3, 3))
    config.distill.hidden_weight = 0.5
  task = build_task(config)
  params = perturbed_params(task)
  teacher_params = task.load_frozen()[0]["teacher"]
  images, noise = random_batch(task)

  def loss_fn(p):
    loss, terms = task.loss_terms(p, teacher_params, jnp.asarray(images), jnp.asarray(noise))
    return loss, terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  to_torch = lambda tree: jax.tree.map(
      lambda x: torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True), tree)
  t_params, t_teacher = to_torch(params), to_torch(teacher_params)
  t_loss, t_rec, t_attn, t_hidden = torch_reference_loss(
      torch, t_params, t_teacher, torch.tensor(images, dtype=torch.float64),
      torch.tensor(noise, dtype=torch.float64), patch=8, mask_ratio=config.mask_ratio,
      student_heads=4, teacher_heads=6, student_depth=3, extra_block=d2,
      decoder_layer=1 if d2 else 3, decoder_heads=2, attn_pairs=config.distill.attn_pairs,
      hidden_pairs=config.distill.hidden_pairs, hidden_weight=config.distill.hidden_weight)
  t_loss.backward()
  np.testing.assert_allclose(terms["loss_rec"], t_rec.item(), rtol=1e-5)
  np.testing.assert_allclose(terms["loss_attn"], t_attn.item(), rtol=1e-5)
  if not d2:
    np.testing.assert_allclose(terms["loss_hidden"], t_hidden.item(), rtol=1e-5)
  else:
    assert "loss_hidden" not in terms
  np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
  t_grads = flatten_with_names(jax.tree.map(lambda t: t.grad, t_params))
  for name, grad in flatten_with_names(grads).items():
    expected = t_grads[name]
    expected = np.zeros(grad.shape) if expected is None else expected.numpy()
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(grad, expected, atol=2e-5 * scale, rtol=1e-3, err_msg=name)
  assert all(t.grad is None or not t.grad.any() for t in jax.tree.leaves(t_teacher))


# ----------------------------------------------------------------------------
# Where the gradients go
# ----------------------------------------------------------------------------
def test_d2mae_reconstruction_ignores_blocks_after_the_decoder_layer(teacher_path):
  # The paper's layout, narrow: 12 blocks + the attention-only 13th, decoder on block 8.
  config = tiny_distill_config(teacher_path)
  config.model.update(depth=12)
  config.mae.decoder_layer = 8
  config.distill.attn_pairs = ((13, 3),)
  task = build_task(config)
  params = perturbed_params(task)
  teacher = task.load_frozen()[0]["teacher"]
  images, noise = map(jnp.asarray, random_batch(task))

  @jax.jit
  def term_grads(params):
    return [jax.grad(lambda p, n=name: task.loss_terms(p, teacher, images, noise)[1][n])(params)
            for name in ("loss_rec", "loss_attn")]

  rec, attn = term_grads(params)
  for i in range(8, 13):  # blocks 9-13 (0-based names), 13 being the attention-only one
    block = f"blocks_{i}"
    assert not any(np.any(g) for g in jax.tree.leaves(rec["encoder"][block])), block
    assert all(np.any(g) for g in jax.tree.leaves(attn["encoder"][block])), block
  for i in range(8):  # blocks 1-8 learn from both
    assert all(np.any(g) for g in jax.tree.leaves(rec["encoder"][f"blocks_{i}"])), i
    assert all(np.any(g) for g in jax.tree.leaves(attn["encoder"][f"blocks_{i}"])), i
  assert all(np.any(g) for g in jax.tree.leaves(rec["decoder"]))
  assert not any(np.any(g) for g in jax.tree.leaves(rec["distill"]))
  assert all(np.any(g) for g in jax.tree.leaves(attn["distill"]))
  # The extra block has only LN1 and qkv.
  assert sorted(flatten_with_names(params["encoder"]["blocks_12"])) == [
      "attn/qkv/bias", "attn/qkv/kernel", "norm1/bias", "norm1/scale"]


def test_teacher_is_frozen_no_gradient_no_optimizer_state(teacher_path):
  config = tiny_distill_config(teacher_path)
  task = build_task(config)
  mesh = sharding.make_mesh(-1, 1)
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract, 10, 0)
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  state = init_state()
  loaded, _ = task.load_frozen()
  frozen, frozen_shardings = loop.place_frozen(loaded, config, mesh)
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  images = np.random.RandomState(0).randint(0, 256, (16, 32, 32, 3)).astype(np.uint8)
  batch = sharding.global_batch({"image": images}, mesh)

  teacher_names = set(flatten_with_names(loaded))
  state_names = set(flatten_with_names(state))
  assert not any("teacher" in name for name in state_names)
  params_before = jax.device_get(state["params"])
  for _ in range(3):
    state, metrics = step(state, frozen, batch)
  assert np.isfinite(metrics["loss_attn"]) and metrics["loss_attn"] > 0
  after = flatten_with_names(jax.device_get(frozen))
  for name, value in flatten_with_names(loaded).items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)
  assert set(after) == teacher_names
  # The student did move, the mapping included.
  moved = jax.device_get(state["params"])
  assert not np.allclose(moved["distill"]["attn_s3_t3"]["kernel"],
                         params_before["distill"]["attn_s3_t3"]["kernel"])
  # Gradient of the loss w.r.t. the teacher's params is exactly zero (stop_gradient).
  rng = jax.random.PRNGKey(0)
  teacher_grads = jax.jit(jax.grad(
      lambda f: task.loss_fn(moved, {}, f, {"image": images}, rng)[0]))(loaded)
  assert not any(np.any(g) for g in jax.tree.leaves(teacher_grads))


def test_teacher_is_fsdp_sharded_by_the_same_rules(teacher_path):
  config = tiny_distill_config(teacher_path)
  config.mesh.fsdp_min_size = 64
  frozen, _ = loop.place_frozen(build_task(config).load_frozen()[0], config,
                                sharding.make_mesh(4, 2))
  qkv = frozen["teacher"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


# ----------------------------------------------------------------------------
# Resume: identical trajectory, teacher hash checked
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tfds"))


def read_losses(workdir):
  import json
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      losses[record["step"]] = (record["loss"], record["loss_attn"])
  return losses


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_checks_the_teacher(tmp_path, demo_dir):
  teacher = make_teacher(tmp_path / "teacher.npz")
  config = tiny_distill_config(teacher)
  config.data.data_dir = demo_dir
  config.total_steps, config.checkpoint_every, config.keep_checkpoints = 4, 2, 5
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, build_task(config))
  uninterrupted = read_losses(workdir)
  assert sorted(uninterrupted) == [1, 2, 3, 4]

  # Back to step 2 as if the run had died there, then rerun with a copy of the
  # same teacher at another path: same content hash, so it resumes.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  copy = str(tmp_path / "same_teacher.npz")
  shutil.copy(teacher, copy)
  config.distill.teacher = copy
  loop.train(config, workdir, build_task(config))
  resumed = read_losses(workdir)
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], uninterrupted[step], rtol=1e-6, err_msg=step)

  # A different teacher is refused, naming both, and the checkpoints stay as they were.
  config.distill.teacher = make_teacher(tmp_path / "other.npz", seed=7)
  config.total_steps = 6
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(CheckpointMismatchError, match=r"trained with teacher .*teacher\.npz.*"
                     r"sha256.*but this run has teacher .*other\.npz"):
    loop.train(config, workdir, build_task(config))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


# ----------------------------------------------------------------------------
# Bad input: clear errors before anything is compiled
# ----------------------------------------------------------------------------
def test_bad_distillation_configs_are_clear_errors(tmp_path, teacher_path):
  def error_of(change, teacher=teacher_path):
    config = tiny_distill_config(teacher)
    change(config)
    with pytest.raises(UserError) as info:
      build_task(config)
    return str(info.value)

  assert "distill.teacher is required" in error_of(lambda c: None, teacher="")
  assert "no such file" in error_of(lambda c: None, teacher=str(tmp_path / "missing.npz"))
  patch16 = make_teacher(tmp_path / "p16.npz", patch_size=16)
  assert "different token counts" in error_of(lambda c: None, teacher=patch16)
  assert "teacher layer 4 is outside 1..3" in error_of(
      lambda c: c.distill.update(attn_pairs=((3, 4),)))
  assert "student layer 4 is outside 1..3" in error_of(
      lambda c: c.distill.update(attn_pairs=((3, 3), (4, 3))))
  assert "expects {'width': 768" in error_of(lambda c: c.distill.update(teacher_variant="base"))
  assert "no distill.attn_pairs entry distils it" in error_of(
      lambda c: c.distill.update(attn_pairs=((2, 3),)))
  assert "use task='d2mae'" in error_of(lambda c: c.update(task="dmae"))
  assert "needs distill.extra_attention_block" in error_of(
      lambda c: c.distill.update(extra_attention_block=False))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  assert "is not a converted .npz" in error_of(lambda c: None, teacher=str(junk))


def test_teacher_file_of_the_wrong_shape_lists_the_leaves(tmp_path):
  from mim_jax.convert import load_converted, save_converted
  source = load_converted(make_teacher(tmp_path / "t.npz"))
  params = jax.tree.map(np.asarray, source.params)
  params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"] = np.zeros((48, 100), np.float32)
  del params["encoder"]["blocks_2"]["norm2"]
  broken = str(tmp_path / "broken.npz")
  save_converted(broken, params, source.arch)
  with pytest.raises(UserError, match=r"missing: blocks_2/norm2/bias, blocks_2/norm2/scale; "
                     r"mismatched: blocks_0/mlp/fc1/kernel \(48, 100\) != \(48, 192\)"):
    build_task(tiny_distill_config(broken))


def test_mae_task_rejects_distillation_settings(tiny_config, teacher_path):
  distilled = tiny_distill_config(teacher_path)
  distilled.task = "mae"
  with pytest.raises(ConfigError, match="task='mae' has no teacher"):
    build_task(distilled)
  tiny_config.mae.decoder_layer = 1
  with pytest.raises(ConfigError, match="untrained"):
    build_task(tiny_config)

