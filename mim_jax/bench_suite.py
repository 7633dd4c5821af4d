r"""One command for an accelerator: the recipes' steps in JAX and PyTorch, one table.

  python -m mim_jax.bench --suite                       # GPU / TPU host: recipe sizes
  python -m mim_jax.bench --suite --suite_size=tiny     # CI: tiny models, CPU, seconds

Rows: MAE-Tiny, D²-MAE-Tiny (a random ViT-B teacher) and ViT-Tiny fine-tuning,
each in float32 and bfloat16 (`model.dtype`), each in JAX and in its PyTorch twin
(`bench_torch.py`, `bench_torch_finetune.py`) on the same device: CUDA for a GPU,
the CPU for the CPU; there is no PyTorch row on a TPU (no torch_xla here). Per
row: images/s, step time (median of the timed steps after one warm-up step),
compile time (JAX: lower + compile; PyTorch: its first step), peak memory and
model-FLOPs utilisation against `PEAK_TFLOPS` of the detected device (blank
where unknown, e.g. the CPU).

Sizes: on an accelerator the recipes (224 px, patch 16, ViT-Tiny / ViT-B teacher)
at `batch` images per device (default 256) and 10 timed steps; on a CPU a batch
of 8 per device and 2 timed steps; `--suite_size=tiny` shrinks the models to 32 px
and two 32-wide blocks (the test suite runs it).

Every row runs in its own process (but tiny rows on the CPU, the test suite's):
peak memory is that row's (`memory_stats()['peak_bytes_in_use']`,
`torch.cuda.max_memory_allocated()`), compile time is a cold compile, PyTorch
never shares the GPU with JAX's allocator, and on the CPU neither framework's
threads compete with the other's. The CPU keeps no allocation statistics: there
JAX's peak memory is the compiled program's (arguments + temporaries + outputs,
`memory_analysis()`) and PyTorch's is left blank.

float32 rows use each framework's default matmul precision on its own terms made
equal: JAX computes float32 matmuls in TF32 on Ampere / Hopper GPUs and in one
bfloat16 pass on TPUs; the PyTorch twin is allowed TF32 too
(`torch.set_float32_matmul_precision('high')`). MFU divides by the peak of that
arithmetic (TF32 on GPUs, bfloat16 on TPUs, plain float32 on GPUs without TF32).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from mim_jax.errors import ConfigError

MODELS = ("mae_tiny", "d2mae_tiny", "finetune_tiny")
DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("jax", "torch")
SIZES = ("recipe", "tiny")

# Dense peak TFLOP/s of one JAX device: (bfloat16, float32 as computed by default).
# Matched by regex on `device_kind`, first match wins. Sources: NVIDIA's data sheets
# (H100 and H200 Tensor Core GPU, A100 Tensor Core GPU, V100 Tensor Core GPU, L4, T4;
# dense, i.e. without 2:4 sparsity); Google Cloud TPU system architecture pages
# (per chip, bfloat16; v2 and v3 expose two devices, i.e. cores, per chip).
PEAK_TFLOPS: tuple[tuple[str, str, float | None, float | None], ...] = (
    # (pattern, name, bfloat16, float32 default-precision)
    (r"h100.*pcie", "H100 PCIe", 756.0, 378.0),  # fp32 = TF32 tensor cores
    (r"h100", "H100 SXM", 989.4, 494.7),
    (r"h200", "H200", 989.4, 494.7),
    (r"a100", "A100", 312.0, 156.0),
    (r"v100.*pcie", "V100 PCIe", None, 14.0),  # no bfloat16 tensor cores; fp32 = FP32
    (r"v100", "V100 SXM2", None, 15.7),
    (r"\bl4\b", "L4", 121.0, 60.0),
    (r"\bt4\b", "T4", None, 8.1),
    (r"tpu v5 ?lite|tpu v5e", "TPU v5e", 197.0, 197.0),  # fp32 matmuls: one bf16 pass
    (r"tpu v5", "TPU v5p", 459.0, 459.0),
    (r"tpu v6 ?lite|tpu v6e", "TPU v6e", 918.0, 918.0),
    (r"tpu v4", "TPU v4", 275.0, 275.0),
    (r"tpu v3", "TPU v3 core", 61.5, 61.5),
    (r"tpu v2", "TPU v2 core", 22.5, 22.5),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Dense peak TFLOP/s of one device of `device_kind` for `dtype` compute; None if unknown."""
  for pattern, _, bf16, fp32 in PEAK_TFLOPS:
    if re.search(pattern, device_kind.lower()):
      return bf16 if dtype == "bfloat16" else fp32
  return None


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
def suite_config(model: str, dtype: str, size: str, batch: int):
  """The config of one row: `model` in `dtype` at `size`, a global batch of `batch`."""
  from mim_jax import config_defaults  # pylint: disable=g-import-not-at-top
  if model == "finetune_tiny":
    config = config_defaults.finetune_config()
  elif model in ("mae_tiny", "d2mae_tiny"):
    config = config_defaults.base_config()
    if model == "d2mae_tiny":
      config = config_defaults.distillation_overrides(config, decoupled=True)
  else:
    raise ValueError(f"unknown suite model {model!r}; choose from {MODELS}")
  if size == "tiny":
    config.image_size = 32
    config.model.update(variant="", patch_size=8, width=32, depth=2, num_heads=4)
    if "mae" in config:
      config.mae.decoder.update(width=16, depth=1, num_heads=2)
    if "distill" in config:  # a random ViT-Tiny teacher, its blocks scanned (fast to compile)
      config.mae.decoder_layer = 1
      config.distill.teacher_variant = "tiny"
      config.distill.teacher_scan_blocks = True
      config.distill.attn_pairs = ((3, 12),)
  elif size != "recipe":
    raise ValueError(f"unknown suite size {size!r}; choose from {SIZES}")
  config.model.dtype = dtype
  config.batch_size = batch
  return config


# ----------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------
def _task(config):
  from mim_jax.tasks.registry import build_task  # pylint: disable=g-import-not-at-top
  if config.task in ("dmae", "d2mae") and not config.distill.teacher:
    return build_task(config, random_teacher=True)
  return build_task(config)


def measure_jax(config, steps: int) -> dict[str, Any]:
  """Compile time, median step time and peak memory of the jitted train step on all devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mim_jax.step_breakdown import median_seconds  # pylint: disable=g-import-not-at-top
  from mim_jax.trainer import loop, sharding  # pylint: disable=g-import-not-at-top

  task = _task(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_size(config.batch_size, mesh)
  abstract_params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract_params, total_steps=1000,
                                     warmup_steps=100,
                                     decay_mask=task.weight_decay_mask(abstract_params),
                                     layer_ids=task.layer_ids(abstract_params))
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  rng = np.random.RandomState(0)
  local = {"image": rng.randint(0, 256, (config.batch_size, config.image_size,
                                         config.image_size, 3)).astype(np.uint8)}
  if task.data_spec.labels:
    local["label"] = rng.randint(0, config.num_classes, config.batch_size).astype(np.int32)
  batch = sharding.global_batch(local, mesh)
  step_fn = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)
  state = {"state": init_state()}
  start = time.perf_counter()
  compiled = step_fn.lower(state["state"], frozen, batch).compile()
  compile_s = time.perf_counter() - start

  def train_step():
    state["state"], metrics = compiled(state["state"], frozen, batch)
    return metrics

  step_s = median_seconds(train_step, steps)
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, source = stats["peak_bytes_in_use"], "measured"
  else:  # the CPU keeps no statistics: the compiled program's live buffers
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
            memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    source = "compiled"
  return {"devices": jax.device_count(), "batch": config.batch_size, "compile_s": compile_s,
          "step_ms": 1e3 * step_s, "images_per_sec": config.batch_size / step_s,
          "peak_mib": peak / 2**20, "peak_source": source,
          "train_flops_per_image": task.train_flops_per_image()}


def measure_torch(config, steps: int, device: str) -> dict[str, Any]:
  """The PyTorch twin of the row's step on `device` ('cpu' or 'cuda')."""
  from mim_jax import bench_torch, bench_torch_finetune  # pylint: disable=g-import-not-at-top
  torch = bench_torch._torch()  # pylint: disable=protected-access
  if device == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32, as JAX's default precision on GPUs
    torch.cuda.reset_peak_memory_stats()
  twin = bench_torch_finetune if config.task == "finetune" else bench_torch
  result = twin.bench(config, steps, device)
  peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
  return {"devices": 1, "batch": config.batch_size, "compile_s": result["first_step_s"],
          "step_ms": result["step_ms"], "images_per_sec": result["images_per_sec"],
          "peak_mib": peak, "peak_source": "measured" if peak is not None else None,
          "train_flops_per_image": _task(config).train_flops_per_image()}


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
  """One row in this process. `spec`: model, dtype, framework, size, batch (per device),
  steps, platform ('cpu', 'gpu' or 'tpu') and device_kind."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.device_count() if spec["framework"] == "jax" else 1
  config = suite_config(spec["model"], spec["dtype"], spec["size"], spec["batch"] * devices)
  if spec["framework"] == "jax":
    result = measure_jax(config, spec["steps"])
  else:
    result = measure_torch(config, spec["steps"], "cuda" if spec["platform"] == "gpu" else "cpu")
  peak = peak_tflops(spec["device_kind"], spec["dtype"])
  tflops = result.pop("train_flops_per_image") * result["images_per_sec"] / 1e12
  result["model_tflops_per_sec"] = tflops
  result["mfu_percent"] = 100 * tflops / (peak * result["devices"]) if peak else None
  return {**{k: spec[k] for k in ("model", "dtype", "framework")}, **result}


# ----------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------
def _child_env(framework: str) -> dict[str, str]:
  env = dict(os.environ)
  if framework == "torch":  # JAX stays off the accelerator the PyTorch twin measures
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_isolated(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  command = [sys.executable, "-m", "mim_jax.bench_suite", json.dumps(spec)]
  try:
    done = subprocess.run(command, env=_child_env(spec["framework"]), capture_output=True,
                          text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  rows = [line[len("ROW "):] for line in done.stdout.splitlines() if line.startswith("ROW ")]
  if done.returncode or not rows:
    lines = [l for l in done.stderr.strip().splitlines() if l.strip()] or ["no output"]
    return {"error": lines[-1][:200]}
  return json.loads(rows[-1])


def probe_devices(isolate: bool) -> dict[str, Any]:
  """{'platform', 'device_kind', 'device_count'}: here, or in a child process that lets go of
  the accelerator when it exits (a TPU admits one process; JAX keeps a GPU's memory)."""
  if not isolate:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices)}
  code = ("import json, jax; d = jax.devices(); print('PROBE ' + json.dumps({'platform': "
          "d[0].platform, 'device_kind': d[0].device_kind, 'device_count': len(d)}))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False)
  if done.returncode or "PROBE " not in done.stdout:
    lines = done.stderr.strip().splitlines() or ["no output"]
    raise RuntimeError(f"could not list the devices: {lines[-1]}")
  return json.loads(done.stdout.split("PROBE ", 1)[1])


def torch_available() -> bool:
  """Whether the PyTorch twins can run (the `torch` extra is installed)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "timm"))


def run_suite(size: str = "recipe", batch: int | None = None, steps: int | None = None,
              models: Sequence[str] = MODELS, dtypes: Sequence[str] = DTYPES,
              frameworks: Sequence[str] = FRAMEWORKS, row_timeout_s: float = 600,
              isolate: bool | None = None, verbose: bool = False
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(device description, rows): every model x dtype x framework that this machine can run.

  `batch` is per device (default: 256 on an accelerator, 8 on the CPU, 2 at size 'tiny');
  `steps` are timed after a warm-up step (default 10 on an accelerator, 2 on the CPU). A
  row that fails (out of memory, a missing backend) keeps its error in the table.
  `isolate`: a process per row (default: except for tiny rows on the CPU, which the
  test suite runs in its own process); `verbose` prints each row as it is done.
  """
  for name, value, allowed in (("size", size, SIZES), ("model", models, MODELS),
                               ("dtype", dtypes, DTYPES), ("framework", frameworks, FRAMEWORKS)):
    unknown = sorted(set([value] if isinstance(value, str) else value) - set(allowed))
    if unknown:
      raise ConfigError(f"suite {name} {unknown[0]!r} is unknown; choose from {allowed}")
  device = probe_devices(isolate=os.environ.get("JAX_PLATFORMS", "") != "cpu")
  accelerator = device["platform"] != "cpu"
  isolate = (accelerator or size == "recipe") if isolate is None else isolate
  batch = batch or (256 if accelerator else 2 if size == "tiny" else 8)
  steps = steps or (10 if accelerator else 2)
  rows = []
  for model in models:
    for dtype in dtypes:
      for framework in frameworks:
        spec = {"model": model, "dtype": dtype, "framework": framework, "size": size,
                "batch": batch, "steps": steps, **device}
        if framework == "torch" and device["platform"] == "tpu":
          row = {"error": "no PyTorch on a TPU here (torch_xla is not used)"}
        elif framework == "torch" and not torch_available():
          row = {"error": "torch/timm not installed: pip install -e '.[torch]'"}
        elif isolate:
          row = _run_isolated(spec, row_timeout_s)
        else:
          try:
            row = run_row(spec)
          except Exception as error:  # pylint: disable=broad-except
            row = {"error": " ".join(f"{type(error).__name__}: {error}".split())[:200]}
        rows.append({"model": model, "dtype": dtype, "framework": framework, **row})
        if verbose:
          print(format_row(rows[-1]), flush=True)
  return device, rows


COLUMNS = ("| model | dtype | framework | devices | batch | images/s | step ms | compile s "
           "| peak MiB | MFU % |")


def _number(value: Any, digits: int) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def format_row(row: dict[str, Any]) -> str:
  head = f"| {row['model']} | {row['dtype']} | {row['framework']} |"
  if "error" in row:
    return f"{head} {row['error']} | | | | | | |"
  mib = row["peak_mib"]
  peak = _number(mib, 1 if mib is not None and mib < 100 else 0)
  peak += " (compiled)" if row["peak_source"] == "compiled" else ""
  return (f"{head} {row['devices']} | {row['batch']} | {row['images_per_sec']:.1f} "
          f"| {row['step_ms']:.1f} | {row['compile_s']:.1f} | {peak} "
          f"| {_number(row['mfu_percent'], 1)} |")


def format_table(device: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
  """The suite's table (markdown), headed by the device and its peak TFLOP/s."""
  bf16, fp32 = (peak_tflops(device["device_kind"], d) for d in ("bfloat16", "float32"))
  peaks = (f"peak {_number(bf16, 1) or '?'} (bfloat16) / {_number(fp32, 1) or '?'} "
           f"(float32) TFLOP/s per device" if bf16 or fp32 else "peak TFLOP/s unknown: no MFU")
  lines = [f"{device['device_kind']} x{device['device_count']} ({device['platform']}), {peaks}",
           "", COLUMNS, "|" + "---|" * 10]
  lines += [format_row(row) for row in rows]
  lines += ["", "compile s: JAX lower + compile, PyTorch its first step; step: median of the "
            "timed steps; peak: measured, or the compiled program's buffers on the CPU"]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """Child process of an isolated row: `python -m mim_jax.bench_suite SPEC_JSON`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  print("ROW " + json.dumps(run_row(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
