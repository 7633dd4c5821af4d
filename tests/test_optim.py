"""Weight-decay mask, lr scaling and the per-step warm-up + cosine schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.models.mae import MAEDecoder, MaskedAutoencoder
from mim_jax.models.vit import VisionTransformer
from mim_jax.trainer import optim
from mim_jax.trainer.tree import flatten_with_names


def mae_params(posemb="sincos"):
  model = MaskedAutoencoder(VisionTransformer(patch_size=4, width=32, depth=2, num_heads=4,
                                              posemb=posemb),
                            MAEDecoder(patch_size=4, width=16, depth=1, num_heads=2))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                        jnp.zeros((1, 4), jnp.int32), jnp.arange(16)[None])["params"]


def test_weight_decay_mask_excludes_biases_norms_tokens_posembed():
  params = mae_params(posemb="learn")
  mask = flatten_with_names(optim.weight_decay_mask(params))
  shapes = {k: v.shape for k, v in flatten_with_names(params).items()}
  for name, decays in mask.items():
    excluded = (len(shapes[name]) == 1 or "token" in name or "pos_embed" in name)
    assert decays == (not excluded), name
  assert mask["encoder/patch_embed/proj/kernel"] and mask["decoder/pred/kernel"]
  assert not mask["encoder/cls_token"] and not mask["decoder/mask_token"]
  assert not mask["encoder/pos_embed"]


def test_lr_scaling_rule():
  assert math.isclose(optim.scaled_learning_rate(1.5e-4, 4096), 2.4e-3)


def test_warmup_cosine_matches_formula():
  peak, warmup, total = 2.4e-3, 10, 50
  schedule = optim.warmup_cosine(peak, warmup, total)
  for step in range(total + 1):
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-10)


def test_adamw_decays_only_masked_leaves():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  tx = optim.adamw(optax.constant_schedule(0.1), b1=0.9, b2=0.95, weight_decay=0.5,
                   decay_mask=optim.weight_decay_mask(params))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))
