"""Distillation-head fine-tuning (MAE-Lite's `finetuning_distill_exp.py`, DeiT) and random
erasing in fine-tuning: the losses against the official formulas (float64 torch), the two
heads against MAE-Lite's distilled ViT and timm's `VisionTransformerDistilled`, the RegNet
teacher from a timm state_dict, sharded == single device, resume == uninterrupted, and bad
input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shipped_config
from mim_jax.convert import load_converted, save_converted, torch_format
from mim_jax.data import random_erasing
from mim_jax.errors import ConfigError
from mim_jax.models.vit import VisionTransformer
from mim_jax.tasks import finetune, finetune_distill
from mim_jax.tasks.base import normalize_images
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop, sharding
from mim_jax.trainer.tree import flatten_with_names

def finetune_config(arg):
  return shipped_config("finetune_vit_tiny.py", arg)


def perturbed(params, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                      .astype(np.float32), params)


@pytest.fixture(scope="module", name="teacher")
def teacher_fixture(tmp_path_factory):
  """A converted ViT classifier of the digits' shape (10 classes, 32 px), random weights."""
  path = str(tmp_path_factory.mktemp("teacher") / "teacher.npz")
  model = VisionTransformer(patch_size=8, width=48, depth=2, num_heads=4, posemb="learn",
                            pool="gap", num_classes=10)
  params = perturbed(model.init(jax.random.PRNGKey(7), np.zeros((1, 32, 32, 3)))["params"], 7)
  save_converted(path, {"encoder": params}, dict(
      patch_size=8, image_size=32, width=48, depth=2, num_heads=4, posemb="learn", pool="gap",
      num_classes=10, source="test teacher"))
  return path


def distill_config(teacher, arg="distill,demo", **model):
  """`arg` on the digits with a 2-block, 32-wide student and the test teacher."""
  config = finetune_config(arg)
  config.model.update(variant="", width=32, depth=2, num_heads=4, **model)
  config.distill.teacher = teacher
  return config


def hand_batch(seed=0, size=8, boxes=True):
  rng = np.random.RandomState(seed)
  batch = {"image": rng.randint(0, 256, (size, 32, 32, 3)).astype(np.uint8),
           "label": rng.randint(0, 10, size).astype(np.int32), "mask": np.ones(size, bool)}
  if boxes:  # half the images erased, as EraseBox's [top, left, h, w]; [0, 0, 0, 0]: none
    batch["erase_box"] = np.array([[2, 3, 10, 12], [0, 0, 0, 0]] * (size // 2), np.int32)
  return batch


def test_distillation_losses_match_the_official_formulas():
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  rng = np.random.RandomState(0)
  student, teacher = (3 * rng.standard_normal((6, 10)).astype(np.float32) for _ in range(2))
  s, t = torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64)
  hard = f.cross_entropy(s, t.argmax(dim=1))
  np.testing.assert_allclose(finetune_distill.hard_distillation_loss(student, teacher),
                             hard.item(), rtol=1e-6)
  for tau in (1.0, 2.5):  # ModelDistill.forward's soft branch
    soft = f.kl_div(f.log_softmax(s / tau, dim=1), f.log_softmax(t / tau, dim=1),
                    reduction="sum", log_target=True) * (tau * tau) / s.numel()
    np.testing.assert_allclose(finetune_distill.soft_distillation_loss(student, teacher, tau),
                               soft.item(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_loss_is_model_distill_forward(teacher, kind):
  """(1 - alpha) * the class loss (label smoothing, mixup targets) + alpha * the
  distillation loss, student and teacher both on the erased, mixed batch."""
  torch = pytest.importorskip("torch")
  from timm.loss import SoftTargetCrossEntropy  # pylint: disable=import-outside-toplevel
  config = distill_config(teacher, "rpe,distill,demo")
  config.model.drop_path_rate = 0.0  # the student's forward below runs without it
  config.random_erasing.prob = 0.25
  config.distill.update(type=kind, alpha=0.3, tau=2.0)
  task = build_task(config)
  params = perturbed(task.init_params(jax.random.PRNGKey(0)), 1)
  frozen, _ = task.load_frozen()
  batch, rng = hand_batch(), jax.random.PRNGKey(5)
  loss, aux = jax.jit(task.loss_fn)(params, {}, frozen, batch, rng)

  images, targets, _ = finetune.training_inputs(config, task.mixup, batch, rng)
  out = jax.jit(task.forward)(params, images)
  t_logits = jax.jit(task.teacher.logits)(frozen["teacher"], images)
  s, kd, t, y = (torch.tensor(np.asarray(a), dtype=torch.float64)
                 for a in (out["logits"], out["logits_dist"], t_logits, targets))
  assert not np.allclose(targets.max(axis=1), 1 - 0.1 + 0.01)  # mixup really mixed
  class_loss = SoftTargetCrossEntropy()(s, y)
  if kind == "hard":
    distill_loss = torch.nn.functional.cross_entropy(kd, t.argmax(dim=1))
  else:
    f = torch.nn.functional
    distill_loss = f.kl_div(f.log_softmax(kd / 2.0, dim=1), f.log_softmax(t / 2.0, dim=1),
                            reduction="sum", log_target=True) * 4.0 / kd.numel()
  np.testing.assert_allclose(aux.terms["loss_ce"], class_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(aux.terms["loss_distill"], distill_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * class_loss.item() + 0.3 * distill_loss.item(),
                             rtol=1e-5)


def test_random_erasing_comes_before_mixup_and_needs_the_worker_field():
  config = finetune_config("demo")
  config.model.update(variant="", width=32, depth=2, num_heads=4)
  config.random_erasing.prob = 0.25
  config.mixup.update(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
  task = build_task(config)
  (field,) = task.data_spec.worker_fields
  assert field == random_erasing.EraseBox(32, probability=0.25)
  batch, rng = hand_batch(boxes=True), jax.random.PRNGKey(3)
  images, targets, _ = finetune.training_inputs(config, task.mixup, batch, rng)
  erased = random_erasing.erase(normalize_images(batch["image"]), batch["erase_box"],
                                jax.random.fold_in(rng, 2), "pixel")
  row = next(i for i in range(8) if batch["label"][i] != batch["label"][7 - i])
  lam = float(targets[row, batch["label"][row]])
  assert 0 < lam < 1
  np.testing.assert_allclose(images, lam * erased + (1 - lam) * erased[::-1], atol=1e-5)
  del batch["erase_box"]
  with pytest.raises(ConfigError, match="random_erasing.prob=0.25 needs the worker field "
                                        "'erase_box'"):
    task.loss_fn({}, {}, {}, batch, rng)  # refused before the params are needed
  assert not build_task(finetune_config("demo")).data_spec.worker_fields  # off by default


TINY_ARCH = {"patch_size": 8, "image_size": 32, "width": 32, "depth": 2, "num_heads": 4,
             "mlp_ratio": 4.0, "posemb": "learn", "num_classes": 10,
             "extra_attention_block": False, "decoder": None}


def test_global_pool_heads_match_mae_lites_distilled_vit(teacher):
  """MAE-Lite's `VisionTransformer(global_pool=True, distilled=True)`: timm's blocks, then
  fc_norm(mean of patch tokens) -> head and dist_norm(cls token) -> head_dist; eval mode
  averages the two."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  task = build_task(distill_config(teacher))
  params = perturbed(task.init_params(jax.random.PRNGKey(0)), 2)
  images = np.random.RandomState(3).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  out = task.forward(params, normalize_images(images))
  arch = {**TINY_ARCH, "pool": "gap"}
  vit = timm.create_model(torch_format.timm_model_name(arch),
                          **torch_format.timm_model_kwargs(arch)).eval()
  state_dict = torch_format.state_dict_from_params({"encoder": params["encoder"]}, arch)
  vit.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  distill = {k: torch.from_numpy(v) for k, v in flatten_with_names(params["distill"]).items()}
  x = torch.from_numpy(np.array(normalize_images(images))).permute(0, 3, 1, 2)
  with torch.no_grad():
    tokens = vit.forward_features(x)  # no final norm under fc_norm (MAE-Lite: `del self.norm`)
    logits = vit.forward_head(tokens)  # fc_norm(mean of the patch tokens) -> head
    x_dist = torch.nn.functional.layer_norm(tokens[:, 0], (32,), distill["dist_norm/scale"],
                                            distill["dist_norm/bias"], eps=1e-6)
    logits_dist = x_dist @ distill["head_dist/kernel"] + distill["head_dist/bias"]
  np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["logits_dist"], logits_dist.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(task.logits(params, images), (logits + logits_dist).numpy() / 2,
                             rtol=1e-4, atol=1e-5)


def test_cls_pool_distillation_token_is_deits(teacher):
  """pool='cls': timm's `VisionTransformerDistilled` (DeiT) with the same weights gives the
  same eval logits (the two heads averaged); the token's leaves are layer 0, undecayed."""
  torch = pytest.importorskip("torch")
  deit_module = pytest.importorskip("timm.models.deit")
  task = build_task(distill_config(teacher, pool="cls"))
  params = perturbed(task.init_params(jax.random.PRNGKey(0)), 4)
  images = np.random.RandomState(5).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  arch = {**TINY_ARCH, "pool": "cls"}
  state_dict = torch_format.state_dict_from_params({"encoder": params["encoder"]}, arch)
  distill = params["distill"]
  pos = state_dict["pos_embed"]
  state_dict.update({
      "pos_embed": np.concatenate([pos[:, :1], distill["pos_embed"], pos[:, 1:]], axis=1),
      "dist_token": distill["dist_token"], "head_dist.weight": distill["head_dist"]["kernel"].T,
      "head_dist.bias": distill["head_dist"]["bias"]})
  deit = deit_module.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32,
                                                depth=2, num_heads=4, num_classes=10,
                                                global_pool="token").eval()
  deit.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    expected = deit(torch.from_numpy(np.array(normalize_images(images))).permute(0, 3, 1, 2))
  np.testing.assert_allclose(task.logits(params, images), expected.numpy(), rtol=1e-4,
                             atol=1e-5)
  ids, num_layers = task.layer_ids(params)
  ids, decays = flatten_with_names(ids), flatten_with_names(task.weight_decay_mask(params))
  for name in ("distill/dist_token", "distill/pos_embed"):
    assert ids[name] == 0 and not decays[name], name
  assert ids["distill/head_dist/kernel"] == num_layers + 1 and decays["distill/head_dist/kernel"]


def test_regnet_teacher_from_a_timm_state_dict(tmp_path, teacher):
  """distill.teacher_arch names a timm RegNet: its state_dict file is imported strictly and
  the teacher's logits are timm's; its analytic FLOPs are close to XLA's count."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  torch.manual_seed(0)
  reference = timm.create_model("regnety_002", pretrained=False, num_classes=10).eval()
  with torch.no_grad():
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics and affine
        module.weight.uniform_(0.5, 1.5)
        module.running_var.uniform_(0.5, 2.0)
        module.running_mean.normal_(0.0, 0.2)
  path = str(tmp_path / "regnety_002.safetensors")
  safetensors_torch.save_file(reference.state_dict(), path)
  config = distill_config(teacher)
  config.distill.update(teacher=path, teacher_arch="regnety_002")
  task = build_task(config)
  frozen, meta = task.load_frozen()
  assert meta["teacher"]["path"] == path and len(meta["teacher"]["sha256"]) == 64
  images = normalize_images(np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3)))
  logits = jax.jit(task.teacher.logits)(frozen["teacher"], images)
  with torch.no_grad():
    expected = reference(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
  compiled = jax.jit(task.teacher.module.apply).lower(frozen["teacher"], images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = task.teacher.forward_flops(64)
  # XLA also counts BatchNorm, ReLU, SE gating and the residual adds, and skips a little
  # of the padding.
  assert 0.98 * analytic <= cost["flops"] / 2 <= 1.15 * analytic, (analytic, cost["flops"])


def one_step(task, config, devices, fsdp, batch):
  """One step of the trainer's own state init and jitted step on a mesh over `devices`."""
  mesh = sharding.make_mesh(-1, fsdp, devices=devices)
  config.mesh.fsdp_min_size = 64  # shard even this tiny model's kernels
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, params, 10, 0, task.weight_decay_mask(params),
                                     task.layer_ids(params))
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  state, metrics = step(init_state(), frozen, sharding.global_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(teacher):
  config = distill_config(teacher, "rpe,distill,demo")
  config.random_erasing.prob = 0.25
  task = build_task(config)
  batch = hand_batch(size=16)
  del batch["mask"]
  one_state, one_metrics = one_step(task, config, jax.devices()[:1], 1, batch)
  many_state, many_metrics = one_step(task, config, jax.devices(), 2, batch)
  assert {"loss", "loss_ce", "loss_distill"} <= set(one_metrics)
  for name in one_metrics:
    np.testing.assert_allclose(many_metrics[name], one_metrics[name], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               one_state["params"], many_state["params"])


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_equals_uninterrupted(tmp_path, teacher):
  """4 steps of `:rpe,distill,demo` on the digits straight, and again resumed from step 2."""
  config = distill_config(teacher, "rpe,distill,demo")
  config.update(total_steps=4, warmup_steps=1, log_every=1, checkpoint_every=2,
                keep_checkpoints=3, eval_every=0, batch_size=16)
  config.data.update(worker_count=0, data_dir=str(tmp_path / "tfds"))
  straight = str(tmp_path / "straight")
  loop.train(config, straight, build_task(config))
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  loop.train(config, resumed, build_task(config))
  assert sorted(read_losses(resumed)) == [1, 2, 3, 4]
  for step, loss in read_losses(straight).items():
    assert read_losses(resumed)[step] == pytest.approx(loss, rel=1e-6), step
  a, b = (flatten_with_names(load_converted(w).params) for w in (straight, resumed))
  assert set(a) == set(b) and any(name.startswith("distill/") for name in a)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("change, message", [
    (dict(type="medium"), "distill.type='medium' is unknown"),
    (dict(alpha=1.5), r"distill.alpha=1.5 must be in \[0, 1\]"),
    (dict(teacher=""), "distill.teacher is required"),
    (dict(teacher_arch="regnety_999"), "unknown RegNet architecture 'regnety_999'"),
])
def test_bad_distillation_settings_are_one_line_errors(teacher, change, message):
  config = distill_config(teacher)
  config.distill.update(change)
  with pytest.raises(Exception, match=message) as info:
    build_task(config)
  assert "\n" not in str(info.value)


def test_bad_teacher_and_model_combinations(teacher, tmp_path):
  config = distill_config(teacher)
  config.num_classes = 7
  with pytest.raises(ConfigError, match="has 10 classes but num_classes=7"):
    build_task(config)
  encoder_only = str(tmp_path / "encoder.npz")
  model = VisionTransformer(patch_size=8, width=32, depth=1, num_heads=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  save_converted(encoder_only, {"encoder": params},
                 dict(patch_size=8, image_size=32, width=32, depth=1, num_heads=4))
  with pytest.raises(ConfigError, match="has no classification head"):
    build_task(distill_config(encoder_only))
  with pytest.raises(ConfigError, match="no relative position index"):
    build_task(distill_config(teacher, "rpe,distill,demo", pool="cls"))
  config = finetune_config("demo")
  config.random_erasing.update(prob=0.25, mode="noise")
  with pytest.raises(ConfigError, match="random_erasing.mode='noise' is unknown"):
    build_task(config)
  with pytest.raises(ValueError, match="bad config argument 'rpe,rpe'"):
    finetune_config("rpe,rpe")


def test_config_arguments_follow_the_official_experiments():
  rpe = finetune_config("rpe,1000ep")
  assert (rpe.model.qkv_bias, rpe.model.rel_pos_bias, rpe.model.abs_pos_embed) == (
      "qv", "per_block", True)
  assert rpe.total_epochs == 1000.0 and rpe.warmup_epochs == 5.0 and rpe.task == "finetune"
  assert rpe.random_erasing.prob == 0.0 and rpe.mixup.mixup_alpha == 0.2  # impr. recipe
  distill = finetune_config("distill")
  assert distill.task == "finetune_distill" and distill.total_epochs == 300.0
  assert (distill.distill.type, distill.distill.alpha, distill.distill.tau,
          distill.distill.teacher_arch) == ("hard", 0.5, 1.0, "regnety_160")
  assert (distill.random_erasing.prob, distill.random_erasing.mode) == (0.25, "pixel")
  assert (distill.mixup.mixup_alpha, distill.mixup.cutmix_alpha,
          distill.mixup.label_smoothing, distill.model.drop_path_rate) == (0.8, 1.0, 0.1, 0.1)
  task = build_task(distill, random_teacher=True)  # the full recipe builds (RegNetY-160)
  # RegNetY-160: 15.9 G multiply-adds at 224 px (timm), i.e. ~31.9 GFLOPs per forward.
  assert 31e9 < task.teacher.forward_flops(224) < 33e9
