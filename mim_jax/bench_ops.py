"""The train step's matrix products one by one: JAX against PyTorch on the same shapes.

Used by `python -m mim_jax.bench --ops`. Each `dot` of the step's optimized XLA
program (forward, backward, teacher, optimizer: everything the step runs) is
re-timed alone, with its own operand shapes and dimension numbers, as a jitted
`lax.dot_general` and as the same `torch.einsum` on the matching device (the CPU:
PyTorch's BLAS; a GPU: cuBLAS; a TPU has no PyTorch column). Summed over the step
(identical products timed once, counted as often as the program runs them) this
says how much of the step the products take and how much of a gap to a PyTorch step
the matrix library alone explains.

A product inside a loop (`lax.scan` over blocks, gradient accumulation) counts
once per trip; the table says so if XLA did not know a loop's trip count.
"""

import collections
import dataclasses
import math
import re
import string
from typing import Any

import jax
import numpy as np

from mim_jax.step_breakdown import median_seconds

_SHAPE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT )?%\S+ = \S+ dot\(%([^,\s]+), %([^,\s)]+)\)(.*)$")
_DTYPE_NAMES = {  # XLA element type -> numpy / torch dtype name
    "f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


@dataclasses.dataclass(frozen=True)
class Product:
  """One dot_general: operand shapes, dtype and dimension numbers."""
  dtype: str  # XLA element type, e.g. "f32"
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    """(batch, M, K, N) of the product as a batched matrix multiply."""
    batch = math.prod(self.lhs[d] for d in self.lhs_batch)
    k = math.prod(self.lhs[d] for d in self.lhs_contract)
    m = math.prod(self.lhs) // (batch * k)
    n = math.prod(self.rhs) // (batch * k)
    return batch, m, k, n

  @property
  def flops(self) -> int:
    batch, m, k, n = self.sizes
    return 2 * batch * m * k * n

  def einsum(self) -> str:
    """The product as einsum subscripts (output: batch, lhs free, rhs free: dot_general's order)."""
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in self.lhs]
    rhs = [next(letters) for _ in self.rhs]
    for left, right in zip(self.lhs_batch + self.lhs_contract, self.rhs_batch + self.rhs_contract):
      rhs[right] = lhs[left]
    free = lambda names, skip: [c for i, c in enumerate(names) if i not in skip]
    out = ([lhs[d] for d in self.lhs_batch] + free(lhs, self.lhs_batch + self.lhs_contract)
           + free(rhs, self.rhs_batch + self.rhs_contract))
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _dims(text: str, name: str) -> tuple[int, ...]:
  found = re.search(name + r"=\{([\d,]*)\}", text)
  return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """The module's computations by name, each as its instruction lines (ENTRY as 'ENTRY')."""
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%(\S+) \(", line)
    if header:
      name = "ENTRY" if header.group(1) else header.group(2)
      computations[name] = []
    elif name is not None and line.startswith("  "):
      computations[name].append(line)
  return computations


def _callees(line: str) -> list[str]:
  """The computations an instruction calls (fusions, loops, reductions, conditionals)."""
  callees = re.findall(r"(?:calls|body|condition|to_apply)=%([^,\s)]+)", line)
  for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
    callees += re.findall(r"%([^,\s]+)", branches)
  return callees


def _runs_per_step(computations: dict[str, list[str]]) -> tuple[dict[str, int], set[str]]:
  """How often each computation runs per call of ENTRY, and those under a loop whose trip
  count XLA does not know (counted as one trip)."""
  callers = collections.defaultdict(list)  # callee -> [(caller, trips, trips known)]
  for caller, lines in computations.items():
    for line in lines:
      trips, known = 1, True
      if " while(" in line:
        found = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trips, known = (int(found.group(1)), True) if found else (1, False)
      for callee in _callees(line):
        callers[callee].append((caller, trips, known))
  runs, uncertain = {"ENTRY": 1}, set()

  def runs_of(name: str) -> int:
    if name not in runs:
      runs[name] = 0  # HLO has no call cycles; this only guards the recursion
      runs[name] = sum(runs_of(caller) * trips for caller, trips, _ in callers[name])
      if any(not known or caller in uncertain for caller, _, known in callers[name]):
        uncertain.add(name)
    return runs[name]

  for name in computations:
    runs_of(name)
  return runs, uncertain


def products_of(hlo_text: str) -> tuple[collections.Counter, bool]:
  """The dots of an optimized HLO module, counted per step; whether a loop's trips were unknown.

  A dot in a loop body counts once per trip when XLA knows the trip count (scans
  over blocks or micro-batches), else once.
  """
  shapes = {}
  for line in hlo_text.splitlines():
    found = _SHAPE.match(line)
    if found:
      name, dtype, dims = found.groups()
      shapes[name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
  computations = _computations(hlo_text)
  runs, uncertain = _runs_per_step(computations)
  counts, unknown_trips = collections.Counter(), False
  for computation, lines in computations.items():
    for line in lines:
      found = _DOT.match(line)
      if not found or not runs[computation]:
        continue
      unknown_trips |= computation in uncertain
      lhs, rhs, attributes = found.groups()
      (dtype, lhs_shape), (_, rhs_shape) = shapes[lhs], shapes[rhs]
      product = Product(dtype, lhs_shape, rhs_shape, _dims(attributes, "lhs_batch_dims"),
                        _dims(attributes, "rhs_batch_dims"),
                        _dims(attributes, "lhs_contracting_dims"),
                        _dims(attributes, "rhs_contracting_dims"))
      counts[product] += runs[computation]
  return counts, unknown_trips


def time_jax(product: Product, steps: int) -> float:
  rng = np.random.default_rng(0)
  dtype = jax.numpy.dtype(_DTYPE_NAMES[product.dtype])
  lhs, rhs = (jax.device_put(rng.standard_normal(shape).astype(dtype))
              for shape in (product.lhs, product.rhs))
  numbers = ((product.lhs_contract, product.rhs_contract), (product.lhs_batch, product.rhs_batch))
  dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))
  return median_seconds(lambda: dot(lhs, rhs), steps)


def torch_device_for_jax() -> str | None:
  """The PyTorch device that matches JAX's backend ('cpu', 'cuda'), or None (TPU, no torch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None


def time_torch(product: Product, steps: int, device: str = "cpu") -> float:
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  dtype = getattr(torch, _DTYPE_NAMES[product.dtype])
  lhs, rhs = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
              for shape in (product.lhs, product.rhs))
  subscripts = product.einsum()

  def run():
    out = torch.einsum(subscripts, lhs, rhs)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  return median_seconds(run, steps)


def compare(hlo_text: str, steps: int, torch_device: str | None = "cpu") -> dict[str, Any]:
  """Per distinct product: count, sizes and seconds in JAX (and PyTorch on `torch_device`,
  unless None); the totals."""
  counts, unknown_trips = products_of(hlo_text)
  rows = []
  for product, count in sorted(counts.items(), key=lambda item: -item[0].flops * item[1]):
    row = {"product": product, "count": count, "jax_s": time_jax(product, steps)}
    if torch_device is not None:
      row["torch_s"] = time_torch(product, steps, torch_device)
    rows.append(row)
  keys = ("jax_s",) if torch_device is None else ("jax_s", "torch_s")
  totals = {key: sum(row["count"] * row[key] for row in rows) for key in keys}
  return {"rows": rows, "totals": totals, "unknown_trips": unknown_trips}


def format_table(result: dict[str, Any], step_ms: float | None = None, top: int = 25) -> str:
  """The products, most total time first, and the per-step totals."""
  torch_column = "torch_s" in result["totals"]
  lines = [f"{'count':>5} {'dtype':>5} {'batch':>6} {'M':>6} {'K':>5} {'N':>6} "
           f"{'JAX ms':>8} {'GFLOP/s':>8}" + (f" {'PyTorch ms':>10} {'GFLOP/s':>8} "
                                              f"{'JAX/PT':>6}" if torch_column else "")]
  rows = sorted(result["rows"], key=lambda row: -row["count"] * row["jax_s"])
  for row in rows[:top]:
    product = row["product"]
    batch, m, k, n = product.sizes
    line = (f"{row['count']:5d} {product.dtype:>5} {batch:6d} {m:6d} {k:5d} {n:6d} "
            f"{1e3 * row['jax_s']:8.2f} {product.flops / row['jax_s'] / 1e9:8.1f}")
    if torch_column:
      line += (f" {1e3 * row['torch_s']:10.2f} {product.flops / row['torch_s'] / 1e9:8.1f} "
               f"{row['jax_s'] / row['torch_s']:6.2f}")
    lines.append(line)
  if len(rows) > top:
    lines.append(f"  ... {len(rows) - top} smaller products not shown (in the totals)")
  totals = result["totals"]
  count = sum(row["count"] for row in rows)
  summary = f"all {count} products per step: JAX {1e3 * totals['jax_s']:.0f} ms"
  if torch_column:
    summary += (f", the same in PyTorch {1e3 * totals['torch_s']:.0f} ms "
                f"({totals['jax_s'] / totals['torch_s']:.2f}x)")
  if step_ms is not None:
    summary += f"; the whole step {step_ms:.0f} ms"
  lines.append(summary)
  if result["unknown_trips"]:
    lines.append("a loop of the program has no known trip count: its products count once")
  return "\n".join(lines)
