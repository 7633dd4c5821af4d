r"""Memory and communication on paper: a train step compiled (never run) for a pod.

`python -m mim_jax.bench --scaling` compiles the training step of MAE-Tiny,
D²-MAE-Tiny (ViT-B teacher) and ViT-B MAE at the recipes' global batch (4096)
for meshes of 8, 64 and 256 simulated devices (fake CPU devices, one
subprocess per mesh size, since the device count is fixed before JAX starts),
with two placements:

* 'data': data parallelism, mesh (N, 1): params, optimizer state and a
  teacher replicated on every device, gradients all-reduced;
* 'fsdp': mesh (1, N): every matrix (`sharding.RULES`, leaves of at least
  `mesh.fsdp_min_size` elements) sharded over all devices, the teacher's too,
  gathered for use and gradients reduce-scattered (ZeRO-3 / FSDP).

For each it reports, per device, the bytes of the params, optimizer state,
frozen inputs (the teacher) and batch held between steps (from the shardings),
the compiler's temporary buffers (`compiled.memory_analysis()`: activations kept
for the backward pass and workspace), and the bytes each collective of the
optimized HLO (`compiled.as_text()`) moves per step: the size of its operand
and, for a ring implementation over its group of n devices, what each device
sends (all-reduce 2 (n-1)/n x size, all-gather and reduce-scatter (n-1)/n x the
gathered size, all-to-all (n-1)/n x size, collective-permute the size).
Collectives inside loops (`lax.scan`: scanned blocks, gradient accumulation)
count once per iteration (XLA's known trip count).

The partitioning is XLA's SPMD partitioner, the same for TPU, GPU and CPU, so
placements, parameter / optimizer bytes and the gathers are those of a real pod.
Two things are the CPU compiler's own: temporary bytes come from its buffer
assignment (its fusion decisions differ from the TPU's and GPU's: an estimate, not
a measurement), and it reduces FSDP's gradients with an all-reduce whose shard each
device keeps, where the GPU and TPU compilers emit a reduce-scatter: on a pod an
FSDP step sends (n-1)/n x the sharded gradients' bytes less than the 'sent/dev'
column says, the same bytes as data parallelism's all-reduce.

  python -m mim_jax.bench --scaling                          # 8, 64, 256 devices
  python -m mim_jax.bench --scaling --scaling_devices=8 --scaling_models=mae_tiny
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from mim_jax.errors import ConfigError

MESH_SIZES = (8, 64, 256)
PLACEMENTS = ("data", "fsdp")
MODELS = ("mae_tiny", "d2mae_tiny", "mae_base")
RECIPE_BATCH = 4096
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}


# ----------------------------------------------------------------------------
# Collectives of an optimized HLO module
# ----------------------------------------------------------------------------
def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string: 'f32[64,5]{1,0}' or a tuple '(f32[8]{0}, bf16[2,4]{1,0})'."""
  total = 0.0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]", shape):
    size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def group_size(line: str, num_partitions: int) -> int:
  """Devices in each replica group of a collective instruction's line."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    axes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
    return math.prod(int(axes[a]) for a in re.findall(r"'([^']+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([^}]*)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  return num_partitions  # replica_groups={} (or none): every device


def _wire_fraction(kind: str, n: int) -> float:
  """Bytes each device sends in a ring implementation, as a multiple of the `size` below."""
  if kind == "collective-permute":
    return 1.0
  if n <= 1:
    return 0.0
  return (2.0 if kind == "all-reduce" else 1.0) * (n - 1) / n


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) +
    r")(?P<start>-start)?\(")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%([\w.\-]+)")


def collective_traffic(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'operand_bytes', 'wire_bytes'}} per device and step, for every kind of
  `COLLECTIVES` in an optimized (SPMD-partitioned) HLO module's text.

  'size' is the gathered buffer for all-gather (its output) and reduce-scatter (its
  operand), the buffer itself otherwise; an op in a while loop's body counts
  trip-count times (1 when XLA does not know the count).
  """
  partitions = re.search(r"num_partitions=(\d+)", hlo_text)
  num_partitions = int(partitions.group(1)) if partitions else 1
  order, bodies, current = [], {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = ("ENTRY" if header.group(1) else "") + header.group(2)
      order.append(current)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  # Callees are printed before their callers: walk callers first.
  multiplier = {name: (1.0 if name.startswith("ENTRY") else 0.0) for name in order}
  traffic = {kind: {"count": 0.0, "operand_bytes": 0.0, "wire_bytes": 0.0}
             for kind in COLLECTIVES}
  for name in reversed(order):
    times = multiplier[name]
    for line in bodies[name]:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      callees = _CALLEE.findall(line) + [
          ("branch", c) for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
          for c in re.findall(r"%([\w.\-]+)", group)]
      for role, callee in callees:
        if callee in multiplier:
          loop = role in ("body", "condition") and trips
          multiplier[callee] += times * (int(trips.group(1)) if loop else 1)
      match = _INSTRUCTION.match(line)
      if not match or times == 0:
        continue
      kind, n = match.group("op"), group_size(line, num_partitions)
      output = shape_bytes(match.group("shape"))
      if match.group("start") and match.group("shape").startswith("("):
        # async start: (operand, output, ...); the gathered / permuted buffer is the largest
        output = max(shape_bytes(s) for s in re.findall(r"[a-z0-9]+\[[0-9,]*\]",
                                                         match.group("shape")))
      operand = {"all-gather": output / n, "reduce-scatter": output * n}.get(kind, output)
      size = operand if kind == "reduce-scatter" else output
      entry = traffic[kind]
      entry["count"] += times
      entry["operand_bytes"] += times * operand
      entry["wire_bytes"] += times * size * _wire_fraction(kind, n)
  return traffic


# ----------------------------------------------------------------------------
# One compiled step (runs in the process whose devices make the mesh)
# ----------------------------------------------------------------------------
def model_config(name: str, batch_size: int = RECIPE_BATCH):
  """The recipe of one of `MODELS` at `batch_size` (a random ViT-B teacher for D²-MAE)."""
  from mim_jax import config_defaults  # pylint: disable=g-import-not-at-top
  config = config_defaults.base_config()
  if name == "d2mae_tiny":
    config = config_defaults.distillation_overrides(config, decoupled=True)
  elif name == "mae_base":  # the MAE paper's ViT-B: decoder 8 blocks x 512 wide, 16 heads
    config.model.variant = "base"
    config.mae.decoder.update(width=512, depth=8, num_heads=16)
  elif name != "mae_tiny":
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
  config.batch_size = batch_size
  return config


def _sharded_bytes(tree: Any, shardings: Any) -> float:
  """Bytes one device holds of `tree` (shapes) placed with `shardings`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sizes = jax.tree.map(lambda leaf, s: float(np.prod(s.shard_shape(leaf.shape)) *
                                             np.dtype(leaf.dtype).itemsize), tree, shardings)
  return float(sum(jax.tree.leaves(sizes)))


def analyze(config, placement: str | None = None) -> dict[str, Any]:
  """Per-device memory and collective traffic of `config`'s train step on all devices of
  this process, placed as `placement` ('data' or 'fsdp'; None: `config.mesh`); compiled,
  not run."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mim_jax.models import scan  # pylint: disable=g-import-not-at-top
  from mim_jax.tasks.registry import build_task  # pylint: disable=g-import-not-at-top
  from mim_jax.trainer import accumulate, loop, sharding  # pylint: disable=g-import-not-at-top

  if placement is None:
    data, fsdp = config.mesh.data, config.mesh.fsdp
    placement = "fsdp" if fsdp != 1 else "data"
  elif placement in PLACEMENTS:
    data, fsdp = (-1, 1) if placement == "data" else (1, -1)
  else:
    raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
  mesh = sharding.make_mesh(data, fsdp)
  sharding.check_batch_size(config.batch_size, mesh)
  distilled = config.task in ("dmae", "d2mae") and not config.distill.teacher
  task = build_task(config, random_teacher=True) if distilled else build_task(config)
  abstract_params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract_params, total_steps=1000,
                                     warmup_steps=100,
                                     decay_mask=task.weight_decay_mask(abstract_params),
                                     layer_ids=task.layer_ids(abstract_params))
  abstract_state, state_shardings, _ = loop.prepare_state(task, tx, config, mesh)
  frozen = {}
  if getattr(task, "distiller", None) is not None:  # shapes only: no 86M-param teacher made
    size = config.image_size
    teacher = task.distiller.teacher
    frozen = {"teacher": jax.eval_shape(
        lambda: scan.unscanned(teacher).init(jax.random.PRNGKey(0),
                                             np.zeros((1, size, size, 3), np.float32)))["params"]}
  frozen_shardings = sharding.tree_shardings(frozen, mesh,
                                             fsdp_min_size=config.mesh.fsdp_min_size)
  frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        frozen, frozen_shardings)
  images = (config.batch_size, config.image_size, config.image_size, 3)
  batch = {"image": jax.ShapeDtypeStruct(images, np.uint8,
                                         sharding=sharding.batch_sharding(mesh))}
  step = loop.jit_train_step(task, tx, schedule, state_shardings, frozen_shardings, mesh)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  traffic = collective_traffic(compiled.as_text())
  state_bytes = {k: _sharded_bytes(abstract_state[k], state_shardings[k])
                 for k in ("params", "opt_state")}
  mib = 2.0**20
  return {
      "model": config.model.variant, "task": config.task, "placement": placement,
      "devices": mesh.size, "mesh": dict(mesh.shape), "batch": config.batch_size,
      "grad_accum_steps": accumulate.grad_accum_steps(config),
      "compile_s": compile_s,
      "params_mib": state_bytes["params"] / mib,
      "opt_state_mib": state_bytes["opt_state"] / mib,
      "frozen_mib": _sharded_bytes(frozen, frozen_shardings) / mib,
      "batch_mib": math.prod(images) / mesh.size / mib,
      "temp_mib": memory.temp_size_in_bytes / mib,
      "total_mib": (memory.argument_size_in_bytes + memory.output_size_in_bytes -
                    memory.alias_size_in_bytes + memory.temp_size_in_bytes) / mib,
      "collectives": traffic,
      "wire_mib": sum(t["wire_bytes"] for t in traffic.values()) / mib,
  }


def micro_batch_memory(config, steps_options: Sequence[int] | None = None
                       ) -> list[dict[str, Any]]:
  """`analyze` (placement `config.mesh`) at each `grad_accum_steps` of `steps_options`;
  default: 1, 2, 4, ... while the micro-batch splits evenly into at least 8 examples a
  device. How much memory a micro-batch needs, to pick `grad_accum_steps` that fits.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if steps_options is None:
    steps_options, steps = [1], 2
    while (config.batch_size % (steps * jax.device_count()) == 0 and
           config.batch_size // (steps * jax.device_count()) >= 8):
      steps_options.append(steps)
      steps *= 2
  config = config.copy_and_resolve_references()
  rows = []
  for steps in steps_options:
    config.grad_accum_steps = steps
    rows.append(analyze(config))
  return rows


def format_memory_table(rows: Sequence[dict[str, Any]]) -> str:
  """grad_accum_steps against per-device MiB (compiled: `memory_analysis()`)."""
  lines = ["| grad_accum_steps | micro-batch | per device | params + opt state | temp | total |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    micro = row["batch"] // row["grad_accum_steps"]
    lines.append(f"| {row['grad_accum_steps']} | {micro} | {micro // row['devices']} "
                 f"| {row['params_mib'] + row['opt_state_mib']:.1f} | {row['temp_mib']:.0f} "
                 f"| {row['total_mib']:.0f} |")
  lines.append("(MiB per device, from the compiled step's buffer assignment)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Meshes of simulated devices, one subprocess each
# ----------------------------------------------------------------------------
def run_mesh(devices: int, models: Sequence[str], placements: Sequence[str] = PLACEMENTS,
             batch_size: int = RECIPE_BATCH, grad_accum_steps: int = 1,
             timeout_s: float = 3600) -> list[dict[str, Any]]:
  """`analyze` of every model x placement in a fresh process with `devices` CPU devices."""
  for name, values, allowed in (("model", models, MODELS), ("placement", placements, PLACEMENTS)):
    unknown = sorted(set(values) - set(allowed))
    if unknown:
      raise ConfigError(f"scaling {name} {unknown[0]!r} is unknown; choose from {allowed}")
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  command = [sys.executable, "-m", "mim_jax.bench_scaling", str(devices), ",".join(models),
             ",".join(placements), str(batch_size), str(grad_accum_steps)]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s,
                        check=False)
  rows = [json.loads(line[len("ROW "):]) for line in done.stdout.splitlines()
          if line.startswith("ROW ")]
  if done.returncode:
    tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
    raise RuntimeError(f"compiling for {devices} devices failed: {tail[0]}")
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per (model, placement, devices): per-device MiB and collective MiB per step."""
  header = ("| model | placement | devices | batch/dev | params | opt state | teacher | temp "
            "| total | all-reduce | all-gather | reduce-scatter | other | sent/dev |")
  lines = [header, "|" + "---|" * 14]
  for row in rows:
    c = {k: v["operand_bytes"] / 2**20 for k, v in row["collectives"].items()}
    other = c["all-to-all"] + c["collective-permute"]
    name = f"{row['task']} ViT-{row['model'].capitalize()}"
    lines.append(
        f"| {name} | {row['placement']} | {row['devices']} | {row['batch'] // row['devices']} "
        f"| {row['params_mib']:.1f} | {row['opt_state_mib']:.1f} | {row['frozen_mib']:.1f} "
        f"| {row['temp_mib']:.0f} | {row['total_mib']:.0f} | {c['all-reduce']:.1f} "
        f"| {c['all-gather']:.1f} | {c['reduce-scatter']:.1f} | {other:.1f} "
        f"| {row['wire_mib']:.1f} |")
  lines.append("(MiB per device; collectives: operand MiB per step; sent/dev: MiB each device "
               "sends per step in ring collectives)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """Child: `python -m mim_jax.bench_scaling DEVICES MODELS PLACEMENTS BATCH GRAD_ACCUM`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  devices, models, placements, batch, grad_accum = argv
  if jax.device_count() != int(devices):
    raise RuntimeError(f"expected {devices} devices, JAX has {jax.device_count()}")
  for model in models.split(","):
    for placement in placements.split(","):
      config = model_config(model, int(batch))
      config.grad_accum_steps = int(grad_accum)
      row = analyze(config, placement)
      print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
