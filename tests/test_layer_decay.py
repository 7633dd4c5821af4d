"""Fine-tuning optimiser (docs/methods.md §7): layer-wise lr decay, weight-decay mask, AdamW.

References written here, independent of mim_jax.trainer.optim: MAE's
`get_layer_id_for_vit` / `param_groups_lrd` on the timm names of the leaves, timm's
own `param_groups_layer_decay` on a real timm ViT, and AdamW with per-group lrs in
numpy (and torch.optim.AdamW with param groups when torch imports).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax.errors import ConfigError
from mim_jax.models.vit import VisionTransformer
from mim_jax.models.vit_backbone import VIT
from mim_jax.trainer import optim
from mim_jax.trainer.tree import flatten_with_names

DEPTH = 12
DECAY = 0.85
NO_WEIGHT_DECAY = {"pos_embed", "cls_token", "dist_token"}  # MAE / timm no_weight_decay()


def vit_tiny_params():
  """Abstract params of the fine-tuning ViT-Tiny: GAP + fc_norm, learned pos_embed, 10 classes."""
  model = VisionTransformer(patch_size=16, width=192, depth=DEPTH, num_heads=12, num_classes=10,
                            pool="gap", posemb="learn")
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]


def timm_name(path):
  """'blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.weight' (timm's VisionTransformer)."""
  name = re.sub(r"blocks_(\d+)", r"blocks.\1", path).replace("/", ".")
  return re.sub(r"\.(kernel|scale)$", ".weight", name)


def mae_layer_id(name, num_layers):
  """MAE util/lr_decay.py `get_layer_id_for_vit`, verbatim in logic."""
  if name in ["cls_token", "pos_embed"]:
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  else:
    return num_layers


def mae_param_groups(shapes, decay, depth):
  """{timm name: (lr_scale, decays)} as MAE's `param_groups_lrd` assigns them."""
  num_layers = depth + 1
  layer_scales = [decay**(num_layers - i) for i in range(num_layers + 1)]
  groups = {}
  for name, shape in shapes.items():
    no_decay = len(shape) == 1 or name in NO_WEIGHT_DECAY
    groups[name] = (layer_scales[mae_layer_id(name, num_layers)], not no_decay)
  return groups


def test_lr_scales_equal_the_formula_for_every_leaf():
  params = vit_tiny_params()
  shapes = {timm_name(k): v.shape for k, v in flatten_with_names(params).items()}
  want = mae_param_groups(shapes, DECAY, DEPTH)
  for tree, prefix in [(params, ""), ({"encoder": params}, "encoder/")]:
    scales = flatten_with_names(optim.layerwise_lr_scales(tree, DEPTH, DECAY, VIT.layer_id))
    assert len(scales) == len(want) == len(jax.tree.leaves(params))
    for path, scale in scales.items():
      assert isinstance(scale, float)
      name = timm_name(path[len(prefix):])
      assert scale == pytest.approx(want[name][0], rel=1e-12), path
      assert VIT.layer_id(path, DEPTH) == mae_layer_id(name, DEPTH + 1), path
  scales = flatten_with_names(optim.layerwise_lr_scales(params, DEPTH, DECAY, VIT.layer_id))
  # The literal values at the ends: head 1, last block decay, embeddings decay^13.
  assert scales["head/kernel"] == scales["fc_norm/scale"] == 1.0
  assert scales["blocks_11/mlp/fc2/bias"] == pytest.approx(DECAY)
  assert scales["blocks_0/attn/qkv/kernel"] == pytest.approx(DECAY**12)
  for name in ("cls_token", "pos_embed", "patch_embed/proj/kernel", "patch_embed/proj/bias"):
    assert scales[name] == pytest.approx(DECAY**13), name


def test_layer_id_paths_and_errors():
  for prefix in ("", "encoder/", "params/encoder/", "params/"):
    assert VIT.layer_id(prefix + "patch_embed/proj/kernel", 12) == 0
    assert VIT.layer_id(prefix + "cls_token", 12) == 0
    assert VIT.layer_id(prefix + "pos_embed", 12) == 0
    assert VIT.layer_id(prefix + "blocks_0/norm1/scale", 12) == 1
    assert VIT.layer_id(prefix + "blocks_11/mlp/fc1/kernel", 12) == 12
    for rest in ("norm/scale", "fc_norm/bias", "head/kernel", "something/else"):
      assert VIT.layer_id(prefix + rest, 12) == 13
  assert VIT.layer_id("decoder/blocks_0/attn/qkv/kernel", 12) == 13  # not the encoder's
  with pytest.raises(ConfigError, match="depth"):
    VIT.layer_id("encoder/blocks_12/attn/qkv/kernel", 12)  # D²-MAE's 13th block
  for depth, decay in [(0, 0.75), (12, 0.0), (12, 1.5)]:
    with pytest.raises(ConfigError):
      optim.layerwise_lr_scales({"head": {"bias": jnp.zeros(2)}}, depth, decay, VIT.layer_id)
  ones = optim.layerwise_lr_scales(vit_tiny_params(), DEPTH, 1.0, VIT.layer_id)
  assert set(jax.tree.leaves(ones)) == {1.0}


def test_finetune_weight_decay_mask_excludes_exactly_1d_and_tokens():
  params = vit_tiny_params()
  shapes = {timm_name(k): v.shape for k, v in flatten_with_names(params).items()}
  want = mae_param_groups(shapes, DECAY, DEPTH)
  mask = flatten_with_names(optim.finetune_weight_decay_mask(params))
  assert len(mask) == len(want)
  for path, decays in mask.items():
    assert decays == want[timm_name(path)][1], path
  excluded = sorted(k for k, v in mask.items() if not v)
  assert excluded == sorted(k for k, v in flatten_with_names(params).items()
                            if v.ndim == 1 or k in ("cls_token", "pos_embed"))
  assert not mask["cls_token"] and not mask["pos_embed"] and mask["head/kernel"]
  # On mim_jax's ViT the pre-training (name-based) mask agrees leaf for leaf.
  assert flatten_with_names(optim.weight_decay_mask(params)) == mask
  # Tokens of any rank are excluded; a 2-D leaf that is not called 'kernel' decays.
  extra = {"mask_token": jnp.zeros((1, 1, 4)), "dist_token": jnp.zeros((1, 1, 4)),
           "rel_pos": {"table": jnp.zeros((5, 4))}, "bias": jnp.zeros(4)}
  assert optim.finetune_weight_decay_mask(extra) == {
      "mask_token": False, "dist_token": False, "rel_pos": {"table": True}, "bias": False}


def test_matches_timm_param_groups_layer_decay():
  """timm's own grouping of the same architecture agrees (names, scales, decay)."""
  pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from timm.optim import param_groups_layer_decay
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                            global_pool="avg", num_heads=12)
  groups = param_groups_layer_decay(model, weight_decay=0.05,
                                    no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=DECAY)
  by_param = {id(p): (g["lr_scale"], g["weight_decay"] > 0) for g in groups for p in g["params"]}
  want = {name: by_param[id(p)] for name, p in model.named_parameters()}
  params = vit_tiny_params()
  scales = {timm_name(k): v for k, v in
            flatten_with_names(optim.layerwise_lr_scales(params, DEPTH, DECAY,
                                                         VIT.layer_id)).items()}
  mask = {timm_name(k): v for k, v in
          flatten_with_names(optim.finetune_weight_decay_mask(params)).items()}
  assert set(scales) == set(want)
  for name, (scale, decays) in want.items():
    assert scales[name] == pytest.approx(scale, rel=1e-12), name
    assert mask[name] == decays, name


# -- AdamW with layer-wise lrs -----------------------------------------------------------

# A 2-block encoder in mim_jax's layout, with its layer id written out by hand.
SMALL = {
    "encoder/patch_embed/proj/kernel": ((2, 2, 3, 4), 0),
    "encoder/patch_embed/proj/bias": ((4,), 0),
    "encoder/cls_token": ((1, 1, 4), 0),
    "encoder/pos_embed": ((1, 5, 4), 0),
    "encoder/blocks_0/attn/qkv/kernel": ((4, 12), 1),
    "encoder/blocks_0/norm1/scale": ((4,), 1),
    "encoder/blocks_1/mlp/fc1/kernel": ((4, 8), 2),
    "encoder/blocks_1/mlp/fc1/bias": ((8,), 2),
    "encoder/fc_norm/scale": ((4,), 3),
    "encoder/head/kernel": ((4, 3), 3),
    "encoder/head/bias": ((3,), 3),
}
SMALL_DEPTH, SMALL_DECAY = 2, 0.5
LR, WD, B1, B2, EPS, STEPS = 0.05, 0.3, 0.9, 0.95, 1e-8, 6


def schedule(count):
  """Warm-up then decay, so every step has its own lr (jnp and numpy alike)."""
  return LR * jnp.minimum((count + 1) / 3, 3 / (count + 1))


def np_schedule(step):
  return LR * min((step + 1) / 3, 3 / (step + 1))


def nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def small_problem():
  rng = np.random.RandomState(0)
  params = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in SMALL.items()}
  grads = [{k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in SMALL.items()}
           for _ in range(STEPS)]
  decays = {k: len(shape) >= 2 and not k.endswith(("cls_token", "pos_embed"))
            for k, (shape, _) in SMALL.items()}
  scales = {k: SMALL_DECAY**(SMALL_DEPTH + 1 - layer) for k, (_, layer) in SMALL.items()}
  return params, grads, decays, scales


def run_optax(params, grads):
  tree = nest({k: jnp.asarray(v) for k, v in params.items()})
  tx = optim.adamw_layerwise(schedule, b1=B1, b2=B2, weight_decay=WD, eps=EPS,
                             decay_mask=optim.finetune_weight_decay_mask(tree),
                             lr_scales=optim.layerwise_lr_scales(tree, SMALL_DEPTH, SMALL_DECAY,
                                                                 VIT.layer_id))
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, grads):
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state

  history = []
  for grad in grads:
    tree, state = step(tree, state, nest({k: jnp.asarray(v) for k, v in grad.items()}))
    history.append({k: np.asarray(v) for k, v in flatten_with_names(tree).items()})
  return history


def test_adamw_layerwise_equals_numpy_adamw_with_per_group_lrs():
  params, grads, decays, scales = small_problem()
  got = run_optax(params, grads)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grad in enumerate(grads, start=1):
    for k in p:  # PyTorch AdamW, one param group per (scale, decay)
      lr = np_schedule(t - 1) * scales[k]
      p[k] = p[k] * (1 - lr * (WD if decays[k] else 0.0))
      m[k] = B1 * m[k] + (1 - B1) * grad[k]
      v[k] = B2 * v[k] + (1 - B2) * grad[k]**2
      m_hat, v_hat = m[k] / (1 - B1**t), v[k] / (1 - B2**t)
      p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + EPS)
      np.testing.assert_allclose(got[t - 1][k], p[k], rtol=2e-5, atol=2e-6, err_msg=f"{k} step {t}")
  # The per-group lrs matter: every leaf moved, and by different amounts per layer.
  moved = {k: np.abs(got[-1][k] - params[k]).mean() for k in params}
  assert moved["encoder/head/bias"] > 2 * moved["encoder/blocks_1/mlp/fc1/bias"]
  assert moved["encoder/blocks_1/mlp/fc1/bias"] > 2 * moved["encoder/patch_embed/proj/bias"]


def test_adamw_layerwise_equals_torch_adamw_param_groups():
  torch = pytest.importorskip("torch")
  params, grads, decays, scales = small_problem()
  got = run_optax(params, grads)
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
  groups = [{"params": [tensors[k]], "scale": scales[k], "weight_decay": WD if decays[k] else 0.0}
            for k in SMALL]
  opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS)
  for t, grad in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = np_schedule(t) * group["scale"]
    for k, x in tensors.items():
      x.grad = torch.tensor(grad[k], dtype=torch.float64)
    opt.step()
    for k, x in tensors.items():
      np.testing.assert_allclose(got[t][k], x.detach().numpy(), rtol=2e-5, atol=2e-6,
                                 err_msg=f"{k} step {t + 1}")


def test_adamw_layerwise_with_unit_scales_is_plain_adamw():
  params, grads, _, _ = small_problem()
  tree = nest({k: jnp.asarray(v) for k, v in params.items()})
  mask = optim.finetune_weight_decay_mask(tree)
  ones = jax.tree.map(lambda _: 1.0, tree)
  kwargs = dict(b1=B1, b2=B2, weight_decay=WD, decay_mask=mask)
  layerwise = optim.adamw_layerwise(schedule, lr_scales=ones, **kwargs)
  plain = optim.adamw(schedule, **kwargs)
  grad = nest({k: jnp.asarray(v) for k, v in grads[0].items()})
  a, _ = jax.jit(layerwise.update)(grad, layerwise.init(tree), tree)
  b, _ = jax.jit(plain.update)(grad, plain.init(tree), tree)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ConfigError, match="lr scales"):
    optim.adamw_layerwise(schedule, lr_scales={"head": 1.0}, **kwargs).init(tree)
