"""`bench --ops`: the step's matrix products found in its optimized program, counted per
step, and re-timed with the same shapes and dimension numbers in JAX and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax import bench_ops
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop


@pytest.fixture(name="torch_module")
def torch_fixture():
  return pytest.importorskip("torch")


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def _attention_and_loop(q, k, w):
  """Logits of (B, N, h, d) q and k, then a 3-trip scan over a matmul with w."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  out, _ = jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), logits, None, length=3)
  return out


def test_products_are_counted_per_trip_with_their_sizes():
  q = k = jnp.ones((2, 5, 3, 4))
  w = jnp.ones((5, 5))
  counts, unknown_trips = bench_ops.products_of(_hlo(_attention_and_loop, q, k, w))
  assert not unknown_trips
  by_sizes = {product.sizes: count for product, count in counts.items()}
  # logits: batch (b, h) = 6 matrices of (5 x 4) @ (4 x 5); the scan body: 3 trips of
  # a (2*3*5 x 5) @ (5 x 5) product.
  assert by_sizes == {(6, 5, 4, 5): 1, (1, 30, 5, 5): 3}
  assert sum(p.flops * n for p, n in counts.items()) == 2 * 6 * 5 * 4 * 5 + 3 * 2 * 30 * 5 * 5
  # Without PyTorch for the device (a TPU), the table is JAX's alone.
  result = bench_ops.compare(_hlo(_attention_and_loop, q, k, w), steps=1, torch_device=None)
  assert [row["count"] for row in result["rows"]] == [3, 1]  # most FLOPs first
  assert "PyTorch" not in bench_ops.format_table(result)


def test_a_loop_of_unknown_length_counts_once_and_the_table_says_so():
  def until_small(x, w):
    body = lambda carry: (jnp.tanh(carry[0] @ w), carry[1] + 1.0)
    return jax.lax.while_loop(lambda carry: carry[1] < carry[0][0, 0] + 3.0, body, (x, 0.0))[0]

  hlo = _hlo(until_small, jnp.ones((4, 4)), jnp.ones((4, 4)))
  counts, unknown_trips = bench_ops.products_of(hlo)
  assert unknown_trips
  assert {product.sizes: count for product, count in counts.items()} == {(1, 4, 4, 4): 1}
  table = bench_ops.format_table(bench_ops.compare(hlo, steps=1, torch_device=None))
  assert table.splitlines()[-1] == ("a loop of the program has no known trip count: "
                                    "its products count once")


def test_the_einsum_of_a_product_computes_what_xla_computes(torch_module):
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(2))
  grad = jax.grad(lambda q, k: jnp.sum(jnp.sin(jnp.einsum("bqhd,bkhd->bhqk", q, k))),
                  argnums=(0, 1))
  counts, _ = bench_ops.products_of(_hlo(grad, q, k))
  assert len(counts) >= 2  # the forward product and its transposes
  for product in counts:
    lhs, rhs = (rng.standard_normal(shape).astype(np.float32)
                for shape in (product.lhs, product.rhs))
    ours = jax.lax.dot_general(lhs, rhs, ((product.lhs_contract, product.rhs_contract),
                                          (product.lhs_batch, product.rhs_batch)))
    theirs = torch_module.einsum(product.einsum(), torch_module.from_numpy(lhs),
                                 torch_module.from_numpy(rhs))
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), rtol=1e-5, atol=1e-5)


def test_a_train_step_table_sums_every_product_of_the_step(torch_module):
  config = tiny_config()
  task = build_task(config)
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract, 10, 1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  batch = {"image": np.zeros((config.batch_size, config.image_size, config.image_size, 3),
                             np.uint8)}
  step = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  compiled = step.lower(init_state(), frozen, batch).compile()
  assert bench_ops.torch_device_for_jax() == "cpu"
  result = bench_ops.compare(compiled.as_text(), steps=1)
  # Every product of the step is in the table, and their FLOPs are XLA's own count of them.
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  product_flops = sum(row["product"].flops * row["count"] for row in result["rows"])
  assert 0.8 * cost["flops"] < product_flops <= cost["flops"]
  assert all(row["jax_s"] > 0 and row["torch_s"] > 0 for row in result["rows"])
  totals = result["totals"]
  assert totals["jax_s"] == pytest.approx(sum(r["count"] * r["jax_s"] for r in result["rows"]))
  table = bench_ops.format_table(result, step_ms=12.0, top=3)
  assert "smaller products not shown" in table
  assert table.splitlines()[-1].startswith(f"all {sum(r['count'] for r in result['rows'])} "
                                           f"products per step: JAX")
