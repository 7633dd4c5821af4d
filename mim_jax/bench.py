r"""Benchmarks: the jitted train step on synthetic on-device data, or the input pipeline.

  python -m mim_jax.bench --config configs/mae_vit_tiny.py --config.batch_size=64
  python -m mim_jax.bench --config configs/mae_vit_tiny.py --peak_tflops=197  # + MFU
  python -m mim_jax.bench --config configs/d2mae_vit_tiny.py --config.batch_size=64
  python -m mim_jax.bench --config configs/finetune_vit_tiny.py --config.batch_size=64
  python -m mim_jax.bench --config configs/mae_vit_tiny.py:demo --data     # pipeline only
  python -m mim_jax.bench --config configs/mae_vit_tiny.py --data \
      --make_folder=/tmp/bench_jpegs --config.data.decoder=turbo    # on ImageNet-sized JPEGs
  python -m mim_jax.bench --config configs/d2mae_vit_tiny.py --config.batch_size=64 --torch
  python -m mim_jax.bench --config configs/d2mae_vit_tiny.py --config.batch_size=256 \
      --config.model.dtype=bfloat16 --peak_tflops=989 --torch --torch_device=cuda  # H100
  python -m mim_jax.bench --config configs/d2mae_vit_tiny.py --config.batch_size=64 \
      --breakdown --profile_dir=/tmp/d2mae_profile
  python -m mim_jax.bench --config configs/mae_vit_tiny.py --config.batch_size=64 --ops

Distillation configs without --config.distill.teacher time a randomly initialised
teacher of `distill.teacher_variant` (the speed does not depend on the weights).

Prints compile time, step time, images/s, the analytic model TFLOP/s and, with
--peak_tflops (the accelerator's dense peak, all devices together), MFU. With
--torch (pre-training tasks; needs the `torch` extra) the same step written with
timm modules and torch.optim.AdamW (`mim_jax/bench_torch.py`) is timed right
after, with the same batch, for a side-by-side images/s: on the CPU, or with
--torch_device=cuda on the GPU (under bfloat16 autocast when model.dtype is
bfloat16).

The input pipeline (--data, `mim_jax/bench_data.py`): images/s of the training
loader of `config.data`, per worker, and per core-second of worker CPU time.
--make_folder=DIR benchmarks on a folder of 300 JPEGs at ImageNet's sizes made
from the photographs in the scikit-image / scikit-learn wheels (written to DIR
unless already there).

Profiling. --breakdown (pre-training tasks) also times, on the same batch, the
loss alone (every forward pass: student, decoder, teacher, losses), the loss and
its gradient (their difference is the backward pass), for distillation the
teacher's forward alone, and the optimizer update alone
(`mim_jax/step_breakdown.py`). --profile_dir writes a
`jax.profiler` trace of the timed steps (TensorBoard's profile plugin / xprof, or
the `*.trace.json.gz` in https://ui.perfetto.dev). --ops times every matrix
product of the compiled step alone, JAX against PyTorch on the same shapes and
dimension numbers (`mim_jax/bench_ops.py`): how much of the step the matrix
library takes, and how much of a gap to PyTorch it explains.
"""

import contextlib
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mim_jax import bench_data, cli, config_checks
from mim_jax.errors import ConfigError, UserError
from mim_jax.step_breakdown import breakdown, median_seconds
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile + warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of all devices, for MFU.")
_DATA = flags.DEFINE_bool("data", False, "Time the input pipeline alone instead of the step.")
_MAKE_FOLDER = flags.DEFINE_string(
    "make_folder", None, "With --data: time the pipeline on the benchmark JPEG folder at this "
    "path (local or gs://), written first unless it exists (mim_jax/bench_data.py).")
_TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch (timm) version of the step.")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where --torch runs the PyTorch step.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False,
                               "Also time the forward, backward, teacher and optimizer alone.")
_OPS = flags.DEFINE_bool(
    "ops", False, "Also time each matrix product of the compiled step alone, JAX against "
    "PyTorch on the same shapes (`mim_jax/bench_ops.py`; PyTorch with the torch extra).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None,
                                   "Write a jax.profiler trace of the timed steps here.")

# --- The accelerator suite, memory and communication on paper, memory against the
# micro-batch (mim_jax/bench_suite.py, mim_jax/bench_scaling.py) -------------------
_SUITE = flags.DEFINE_bool(
    "suite", False, "Time MAE-Tiny, D²-MAE-Tiny and ViT-Tiny fine-tuning, float32 and bfloat16, "
    "JAX and PyTorch, on this machine's accelerator; one table (no --config).")
_SUITE_SIZE = flags.DEFINE_enum("suite_size", "recipe", ["recipe", "tiny"],
                                "--suite: the recipes' models at 224 px, or tiny ones (CI).")
_SUITE_BATCH = flags.DEFINE_integer(
    "suite_batch", None, "--suite: images per device (default 256 on an accelerator, 8 on "
    "the CPU, 2 with --suite_size=tiny); --steps sets the timed steps (default 10 / 2).")
_SUITE_MODELS = flags.DEFINE_list("suite_models", "mae_tiny,d2mae_tiny,finetune_tiny",
                                  "--suite: the rows' models.")
_SUITE_DTYPES = flags.DEFINE_list("suite_dtypes", "float32,bfloat16", "--suite: compute dtypes.")
_SCALING = flags.DEFINE_bool(
    "scaling", False, "Compile (never run) MAE-Tiny, D²-MAE-Tiny and ViT-B MAE for meshes of "
    "simulated devices; print per-device memory and collective bytes per step (no --config).")
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", "8,64,256", "--scaling: mesh sizes.")
_SCALING_MODELS = flags.DEFINE_list("scaling_models", "mae_tiny,d2mae_tiny,mae_base",
                                    "--scaling: models.")
_SCALING_PLACEMENTS = flags.DEFINE_list("scaling_placements", "data,fsdp",
                                        "--scaling: placements (data parallel, FSDP).")
_SCALING_BATCH = flags.DEFINE_integer("scaling_batch", 4096, "--scaling: global batch.")
_SCALING_ACCUM = flags.DEFINE_integer("scaling_grad_accum", 1,
                                      "--scaling: grad_accum_steps of the compiled steps.")
_ACCUM_MEMORY = flags.DEFINE_bool(
    "accum_memory", False, "With --config: compile the step at grad_accum_steps = 1, 2, 4, ... "
    "and print the memory per device each needs, to pick a micro-batch that fits.")
flags.register_multi_flags_validator(
    ["config", "suite", "scaling"], lambda f: f["config"] is not None or f["suite"] or f["scaling"],
    message="--config is required (except with --suite or --scaling)")


def run_suite_or_scaling(config) -> bool:
  """Runs --suite, --scaling or --accum_memory if one is set; whether one was."""
  from mim_jax import bench_scaling, bench_suite  # pylint: disable=g-import-not-at-top
  if _SUITE.value:
    steps = _STEPS.value if flags.FLAGS["steps"].present else None
    device, rows = bench_suite.run_suite(_SUITE_SIZE.value, _SUITE_BATCH.value, steps,
                                         _SUITE_MODELS.value, _SUITE_DTYPES.value, verbose=True)
    print(bench_suite.format_table(device, rows))
  elif _SCALING.value:
    rows = []
    for devices in _SCALING_DEVICES.value:
      print(f"compiling for {devices} simulated devices ...", flush=True)
      rows += bench_scaling.run_mesh(int(devices), _SCALING_MODELS.value,
                                     _SCALING_PLACEMENTS.value, _SCALING_BATCH.value,
                                     _SCALING_ACCUM.value)
    print(bench_scaling.format_table(rows))
  elif _ACCUM_MEMORY.value:
    print(f"train step ({config.task}), global batch {config.batch_size}, on "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}:")
    print(bench_scaling.format_memory_table(bench_scaling.micro_batch_memory(config)))
  else:
    return False
  return True
# --- end of the suite / scaling block ---------------------------------------------


def bench_task(config):
  """The task; distillation without a teacher file times a random teacher (same speed)."""
  if config.task in ("dmae", "d2mae", "finetune_distill") and not config.distill.teacher:
    print("distill.teacher unset: timing with a randomly initialised teacher")
    return build_task(config, random_teacher=True)
  return build_task(config)


def synthetic_batch(task, batch_size: int, config) -> dict[str, np.ndarray]:
  """Random data of the shapes the task's data spec asks for (views, worker fields, labels)."""
  rng = np.random.default_rng(0)
  spec = task.data_spec
  batch = {view.key: rng.integers(0, 256, (batch_size, view.size, view.size, 3), np.uint8)
           for view in spec.views}
  for field in spec.worker_fields:
    batch[field.name] = np.stack([field.make(rng) for _ in range(batch_size)])
  if spec.labels:
    batch["label"] = rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32)
  return batch


def bench_step(config) -> tuple[dict[str, float], Any]:
  """Times the jitted train step; the results and the compiled step."""
  task = bench_task(config)
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  abstract_params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  tx, schedule = loop.make_optimizer(config, abstract_params, 1000, 100,
                                     task.weight_decay_mask(abstract_params),
                                     task.layer_ids(abstract_params))
  _, shardings, init_state = loop.prepare_state(task, tx, config, mesh)
  state = init_state()
  frozen, frozen_shardings = loop.place_frozen(task.load_frozen()[0], config, mesh)
  batch = sharding.global_batch(synthetic_batch(task, config.batch_size, config), mesh)
  step_fn = loop.jit_train_step(task, tx, schedule, shardings, frozen_shardings, mesh)

  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  current = {"state": state}

  def train_step():
    current["state"], metrics = compiled(current["state"], frozen, batch)  # donates the state
    return metrics

  profile = (jax.profiler.trace(_PROFILE_DIR.value) if _PROFILE_DIR.value
             else contextlib.nullcontext())
  with profile:
    step_s = median_seconds(train_step, _STEPS.value)
  result = {
      "devices": jax.device_count(),
      "batch": config.batch_size,
      "compile_s": compile_s,
      "step_ms": 1e3 * step_s,
      "images_per_sec": config.batch_size / step_s,
      "model_tflops_per_sec": task.train_flops_per_image() * config.batch_size / step_s / 1e12,
  }
  if _PEAK.value:
    result["mfu_percent"] = 100 * result["model_tflops_per_sec"] / _PEAK.value
  if _BREAKDOWN.value:
    result.update(breakdown(task, tx, current["state"], frozen, batch, step_s, _STEPS.value))
  return result, compiled


def print_result(result: dict[str, Any]) -> None:
  for key, value in result.items():
    print(f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}")


def print_products(compiled, step_ms: float) -> None:
  from mim_jax import bench_ops  # pylint: disable=g-import-not-at-top
  torch_device = bench_ops.torch_device_for_jax()
  if torch_device is None:
    print("the step's matrix products one by one (JAX only: no PyTorch for this device):")
  else:
    import torch  # pylint: disable=g-import-not-at-top
    threads = f", {torch.get_num_threads()} threads" if torch_device == "cpu" else ""
    print(f"the step's matrix products one by one, and in PyTorch on {torch_device}{threads}:",
          flush=True)
  result = bench_ops.compare(compiled.as_text(), _STEPS.value, torch_device)
  print(bench_ops.format_table(result, step_ms))


PRETRAINING_TASKS = ("mae", "dmae", "d2mae")


def check_flags(config) -> None:
  """Flags that cannot work together or with `config`: one line before anything compiles."""
  if _STEPS.value < 1:
    raise UserError(f"--steps={_STEPS.value} must be >= 1 (timed steps)")
  if _PEAK.value is not None and not _PEAK.value > 0:
    raise UserError(f"--peak_tflops={_PEAK.value} must be > 0: the devices' peak dense "
                    f"TFLOP/s, all together")
  if _TORCH_DEVICE.present and not _TORCH.value:
    raise UserError(f"--torch_device={_TORCH_DEVICE.value} needs --torch (it says where the "
                    f"PyTorch step runs)")
  step_only = {"torch": _TORCH.value, "breakdown": _BREAKDOWN.value, "ops": _OPS.value,
               "peak_tflops": _PEAK.value is not None, "profile_dir": _PROFILE_DIR.value}
  if _DATA.value:
    given = [f"--{name}" for name, value in step_only.items() if value]
    if given:
      raise UserError(f"{', '.join(given)} only apply to the train step, which --data does "
                      f"not run; drop one or the other")
  for name in ("torch", "breakdown"):
    if step_only[name] and config.task not in PRETRAINING_TASKS:
      raise UserError(f"--{name} times pre-training steps {PRETRAINING_TASKS}; "
                      f"task={config.task!r} is not one")
  if _PROFILE_DIR.value is not None:
    config_checks.check_output_dir(_PROFILE_DIR.value, "--profile_dir",
                                   "a directory for the profiler trace")
  if _TORCH.value:
    try:
      import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise UserError(f"--torch needs torch and timm: pip install -e '.[torch]' "
                      f"({error})") from None
    if _TORCH_DEVICE.value == "cuda" and not torch.cuda.is_available():
      raise UserError("--torch_device=cuda but torch sees no CUDA device "
                      "(torch.cuda.is_available() is False); use --torch_device=cpu")


def main(argv):
  config = _CONFIG.value

  def run():
    cli.check_no_arguments(argv)
    config_checks.check_config(config)
    check_flags(config)
    if run_suite_or_scaling(config):
      return
    if _MAKE_FOLDER.value:
      if not _DATA.value:
        raise ConfigError("--make_folder times the input pipeline: add --data.")
      bench_data.use_folder(config, _MAKE_FOLDER.value)
    compiled = None
    if _DATA.value:
      result = bench_data.bench_data(config, _STEPS.value)
    else:
      result, compiled = bench_step(config)
    kind = "input pipeline" if _DATA.value else f"train step ({config.task})"
    print(f"{kind} on {jax.devices()[0].device_kind} x{jax.device_count()}:")
    print_result(result)
    if _TORCH.value and not _DATA.value:
      from mim_jax import bench_torch  # pylint: disable=g-import-not-at-top
      print(f"the same step in PyTorch + timm on {_TORCH_DEVICE.value}:")
      print_result(bench_torch.bench(config, _STEPS.value, _TORCH_DEVICE.value))
    if _OPS.value:
      print_products(compiled, result["step_ms"])

  cli.run_reporting_user_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
