"""`bench --suite` (bench_suite.py), `bench --scaling` and `--accum_memory` (bench_scaling.py):
the peak table, the suite on this CPU, the HLO collective parser against hand-counted
modules, and compiled per-device memory / traffic against the parameter counts."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax import bench_scaling, bench_suite, config_defaults
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import sharding
from mim_jax.trainer.tree import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA L40S", "bfloat16", None),  # not an L4
    ("Tesla T4", "float32", 8.1),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "float32", 459.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
    ("cpu", "float32", None),
])
def test_peak_tflops_by_device_kind(kind, dtype, expected):
  assert bench_suite.peak_tflops(kind, dtype) == expected


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_torch_fine_tuning_twin_trains_as_many_parameters(pool):
  pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  from mim_jax import bench_torch_finetune  # pylint: disable=import-outside-toplevel
  config = config_defaults.finetune_demo_overrides(config_defaults.finetune_config())
  config.model.update(variant="", width=32, depth=2, num_heads=4, pool=pool,
                      drop_path_rate=0.1)
  jax_params = count_params(jax.eval_shape(build_task(config).init_params,
                                           jax.random.PRNGKey(0)))
  torch.manual_seed(0)
  step, torch_params = bench_torch_finetune.build_step(config)
  assert torch_params == jax_params
  images = torch.from_numpy(np.random.RandomState(0).standard_normal(
      (8, 3, config.image_size, config.image_size)).astype(np.float32))
  losses = [float(step(images, torch.arange(8) % 10)) for _ in range(2)]  # mixup on
  assert all(np.isfinite(losses)), losses


@pytest.mark.slow
def test_suite_runs_on_this_cpu():
  """The CI run of `bench --suite`: every model in JAX and its PyTorch twin, tiny sizes."""
  device, rows = bench_suite.run_suite(size="tiny", dtypes=("float32",), steps=1)
  assert device["platform"] == "cpu"
  assert [(r["model"], r["framework"]) for r in rows] == [
      (m, f) for m in bench_suite.MODELS for f in bench_suite.FRAMEWORKS]
  for row in rows:
    if row["framework"] == "torch" and not bench_suite.torch_available():
      assert "pip install" in row["error"]
      continue
    assert "error" not in row, row
    assert row["images_per_sec"] > 0 and row["mfu_percent"] is None  # no CPU peak
    if row["framework"] == "jax":
      # The compiled program holds at least the params and AdamW's two moments.
      config = bench_suite.suite_config(row["model"], "float32", "tiny", row["batch"])
      task = bench_suite._task(config)  # pylint: disable=protected-access
      params = count_params(jax.eval_shape(task.init_params,
                                           jax.random.PRNGKey(0)))
      assert row["peak_source"] == "compiled" and row["peak_mib"] * 2**20 > 3 * 4 * params
  table = bench_suite.format_table(device, rows)
  assert table.count("\n| ") == len(rows) + 1 and "no MFU" in table


def test_bad_suite_request_is_one_line():
  done = subprocess.run([sys.executable, "-m", "mim_jax.bench", "--suite",
                         "--suite_models=mae_tiny,vit_huge"], capture_output=True, text=True,
                        cwd=REPO, check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      "error: suite model 'vit_huge' is unknown; choose from ('mae_tiny', 'd2mae_tiny', "
      "'finetune_tiny')")


# ----------------------------------------------------------------------------
# Collectives from HLO text
# ----------------------------------------------------------------------------
HLO = """HloModule jit_step, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %ag = f32[16,4]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[16,4]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[16,4])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,8], b: bf16[64]) -> f32[8,8] {
  %ar = (f32[8,8]{1,0}, bf16[64]{0}) all-reduce(%a, %b), replica_groups={}, to_apply=%add
  %rs = f32[2,8]{1,0} reduce-scatter(%a), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %a2a = f32[8,8]{1,0} all-to-all(%a), replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, dimensions={0}
  %cp = f32[8,8]{1,0} collective-permute(%a), source_target_pairs={{0,1},{1,0}}
  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(%c), replica_groups=mesh['data'=8] {'data'}, dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  %loop = (s32[], f32[16,4]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[8,8] copy(%a)
}
"""


def test_collective_traffic_counts_sizes_groups_and_loop_trips():
  traffic = bench_scaling.collective_traffic(HLO)
  by_kind = {k: (v["count"], v["operand_bytes"], v["wire_bytes"]) for k, v in traffic.items()}
  # all-reduce of a 256 B + 128 B tuple over all 8 devices: 2 * 7/8 of it sent.
  assert by_kind["all-reduce"] == (1, 384, 2 * 7 / 8 * 384)
  # reduce-scatter to 64 B from a 256 B operand, groups of 4: 3/4 of the operand sent.
  assert by_kind["reduce-scatter"] == (1, 256, 3 / 4 * 256)
  # collective-permute sends its buffer; all-to-all in groups of 4 keeps 1/4 of it.
  assert by_kind["collective-permute"] == (1, 256, 256)
  assert by_kind["all-to-all"] == (1, 256, 3 / 4 * 256)
  # all-gathers: the async one (16 B -> 128 B over 8) and 3 loop trips of 64 B -> 256 B over 4.
  gathered = (1 + 3, 16 + 3 * 64, 7 / 8 * 128 + 3 * 3 / 4 * 256)
  np.testing.assert_allclose(by_kind["all-gather"], gathered)


def test_shape_bytes():
  assert bench_scaling.shape_bytes("f32[64,5]{1,0}") == 64 * 5 * 4
  assert bench_scaling.shape_bytes("(bf16[3]{0}, /*index=1*/pred[], s8[2,2])") == 6 + 1 + 4
  with pytest.raises(ValueError, match="unknown HLO element type"):
    bench_scaling.shape_bytes("q7[3]")


@pytest.fixture(scope="module", name="compiled_rows")
def compiled_rows_fixture():
  """The tiny MAE step compiled for the 8 test devices: data-parallel, FSDP, and
  data-parallel over 4 micro-batches."""
  config = tiny_config()
  config.batch_size = 64
  config.mesh.fsdp_min_size = 256  # the tiny model's matrices are small
  rows = {p: bench_scaling.analyze(config, p) for p in bench_scaling.PLACEMENTS}
  rows["accumulated"] = bench_scaling.micro_batch_memory(config, [4])[0]
  return config, rows


def test_scaling_memory_and_traffic_match_the_parameter_count(compiled_rows):
  config, rows = compiled_rows
  abstract = jax.eval_shape(build_task(config).init_params, jax.random.PRNGKey(0))
  param_bytes = 4 * count_params(abstract)
  data, fsdp = rows["data"], rows["fsdp"]
  assert data["devices"] == fsdp["devices"] == 8
  assert data["params_mib"] * 2**20 == param_bytes
  # AdamW: two float32 moments per parameter, and a step count.
  assert 2 * param_bytes <= data["opt_state_mib"] * 2**20 <= 2 * param_bytes + 64
  # Data parallel: the gradients are all-reduced once (plus the loss scalars), nothing else.
  reduced = data["collectives"]["all-reduce"]["operand_bytes"]
  assert param_bytes <= reduced <= param_bytes + 64
  assert all(data["collectives"][k]["count"] == 0 for k in bench_scaling.COLLECTIVES[1:])
  # FSDP: each sharded matrix is an eighth per device, and is all-gathered for use.
  mesh = sharding.make_mesh(1, 8)
  sharded = sum(4 * np.prod(leaf.shape) for leaf, spec in zip(
      jax.tree.leaves(abstract), jax.tree.leaves(sharding.tree_shardings(
          abstract, mesh, fsdp_min_size=256), is_leaf=lambda s: hasattr(s, "spec")))
      if spec.spec != sharding.P())
  assert sharded > 0
  assert fsdp["params_mib"] * 2**20 == param_bytes - sharded + sharded / 8
  assert fsdp["collectives"]["all-gather"]["operand_bytes"] >= sharded / 8


def test_accumulation_shrinks_the_activations(compiled_rows):
  _, rows = compiled_rows
  accumulated, whole = rows["accumulated"], rows["data"]
  assert accumulated["grad_accum_steps"] == 4 and whole["grad_accum_steps"] == 1
  assert accumulated["params_mib"] == whole["params_mib"]
  assert accumulated["temp_mib"] < whole["temp_mib"]
  table = bench_scaling.format_memory_table([whole, accumulated])
  assert "| 4 | 16 | 2 |" in table


@pytest.mark.slow
def test_scaling_cli_on_eight_simulated_devices():
  done = subprocess.run(
      [sys.executable, "-m", "mim_jax.bench", "--scaling", "--scaling_devices=8",
       "--scaling_models=mae_tiny", "--scaling_placements=data", "--scaling_batch=64"],
      capture_output=True, text=True, cwd=REPO, check=False, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith("| mae ViT-Tiny | data | 8"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  config = config_defaults.base_config()
  params_mib = 4 * count_params(jax.eval_shape(build_task(config).init_params,
                                               jax.random.PRNGKey(0))) / 2**20
  assert float(cells[4]) == pytest.approx(params_mib, abs=0.05)  # params per device
  assert float(cells[9]) == pytest.approx(params_mib, abs=0.05)  # all-reduced per step
