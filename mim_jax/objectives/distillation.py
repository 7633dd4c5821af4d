"""Distillation losses of D-MAE / D²-MAE (docs/methods.md §3-4), as plain jnp functions.

The teacher's side is always wrapped in `stop_gradient`; the learnable mappings
are explicit arguments so the caller decides where they live in the params.
"""

import chex
import jax
import jax.numpy as jnp


def mapping_init(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """(d_in, d_out) kernel of a distillation mapping, initialised as the reference does.

  The reference's head mapping is a 1x1 `nn.Conv2d(h_s, h_t, bias=False)` and its
  hidden mapping an `nn.Linear(d_s, d_t, bias=False)`, both created after MAE's own
  init, so they keep PyTorch's default: kaiming-uniform(a=sqrt(5)), which is
  U(-1/sqrt(d_in), 1/sqrt(d_in)).
  """
  bound = 1.0 / shape[0]**0.5
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def map_heads(student_logits: jax.Array, kernel: jax.Array) -> jax.Array:
  """(M A_s)[b, i] = sum_j M[i, j] A_s[b, j], with kernel[j, i] = M[i, j]."""
  return jnp.einsum("bjqk,ji->biqk", student_logits, kernel)


def attention_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                                kernel: jax.Array) -> jax.Array:
  """mean((M A_s - stop_gradient(A_t))^2) over all elements, in float32.

  Args:
    student_logits: (B, h_s, N, N) pre-softmax attention logits of the student.
    teacher_logits: (B, h_t, N, N) of the teacher, same tokens in the same order.
    kernel: (h_s, h_t) head mapping (no bias).
  """
  chex.assert_rank([student_logits, teacher_logits], 4)
  chex.assert_equal_shape_prefix([student_logits, teacher_logits], 1)
  chex.assert_equal_shape_suffix([student_logits, teacher_logits], 2)
  chex.assert_shape(kernel, (student_logits.shape[1], teacher_logits.shape[1]))
  mapped = map_heads(student_logits.astype(jnp.float32), kernel.astype(jnp.float32))
  target = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  return jnp.mean(jnp.square(mapped - target))


def hidden_distillation_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                             kernel: jax.Array) -> jax.Array:
  """mean((H_s W - stop_gradient(H_t))^2): (B, N, d_s) x (d_s, d_t) vs (B, N, d_t)."""
  chex.assert_rank([student_hidden, teacher_hidden], 3)
  chex.assert_equal_shape_prefix([student_hidden, teacher_hidden], 2)
  chex.assert_shape(kernel, (student_hidden.shape[-1], teacher_hidden.shape[-1]))
  mapped = student_hidden.astype(jnp.float32) @ kernel.astype(jnp.float32)
  target = jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
  return jnp.mean(jnp.square(mapped - target))
