"""Every user mistake on every command is one line, exit status 2, and touches nothing.

One row per mistake: a command line (tiny model, 1-3 steps) and a piece of text the
error must contain, the offending value. Each row must end with exit status 2 and
exactly one `error:` line on stderr containing it, no traceback (nor grain's
"handle is closed" after the error), and no escaped quotes or `\\n` in the line.
`{run}` is a copy of a prepared workdir (a real 2-step run, made once per session)
that must be byte-for-byte the same afterwards; `{new}` is a path that must still
not exist.

The rows run through `cli_runner.CliRunner`: one process imports JAX and the rest
once, then forks a child per command line that runs the CLI module as `python -m`
does. Most rows fail before any JAX work and cost a fraction of a second.

The rules of `mim_jax.config_checks` are also tested in-process: every shipped config
passes them, every rule's key is in some config (a key that moves must be re-pointed
there), and a broken rule names its key and value.
"""

import dataclasses
import glob
import hashlib
import importlib.util
import os
import re
import shutil

import ml_collections
import pytest

from cli_runner import CliRunner
from mim_jax import config_checks
from mim_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# conftest's tiny model as flags; data.data_dir is the session's demo set.
TINY = ("--config.image_size=32", "--config.batch_size=16", "--config.total_steps=2",
        "--config.warmup_steps=1", "--config.log_every=1", "--config.checkpoint_every=1",
        "--config.image_every=0", "--config.model.variant=", "--config.model.patch_size=8",
        "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=4",
        "--config.mae.decoder.width=16", "--config.mae.decoder.num_heads=2",
        "--config.data.worker_count=0", "--config.data.data_dir={data}")
MAE = ("--config={configs}/mae_vit_tiny.py:demo", *TINY)
TRAIN = (*MAE, "--workdir={run}")
# D²-MAE on the tiny student (block 3 is the extra one, the decoder reads block 1); the
# prepared run is a 2-block teacher. Each row sets distill.attn_pairs once: a repeated
# tuple override adds to the first instead of replacing it.
D2MAE = ("--config={configs}/d2mae_vit_tiny.py:demo", *TINY, "--workdir={run}",
         "--config.mae.decoder_layer=1", "--config.distill.teacher_variant=")
PAIR = "--config.distill.attn_pairs=((3,2),)"
BENCH = (*MAE, "--steps=1")
DEMO = ("--workdir={run}", "--config.data.data_dir={data}")
CKA = ("cka", "--model_a={run}", "--model_b={run}", "--out={new}", "--data_dir={data}",
       "--batch_size=8", "--num_batches=1")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  module: str
  args: tuple[str, ...]
  message: str  # must be in the error line ({placeholders} filled in)
  marks: tuple = ()


ROWS = (
    # --- train: values that cannot work (issue 13, items 3 and 8) ---------------------
    Row("keep_checkpoints_0", "train", (*TRAIN, "--config.total_steps=3",
                                        "--config.keep_checkpoints=0"), "keep_checkpoints=0"),
    Row("keep_checkpoints_negative", "train", (*TRAIN, "--config.keep_checkpoints=-1"),
        "keep_checkpoints=-1"),
    Row("log_every_0", "train", (*TRAIN, "--config.log_every=0"), "log_every=0"),
    Row("checkpoint_every_0", "train", (*TRAIN, "--config.checkpoint_every=0"),
        "checkpoint_every=0"),
    Row("image_every_negative", "train", (*TRAIN, "--config.image_every=-1"), "image_every=-1"),
    Row("total_steps_0", "train", (*TRAIN, "--config.total_steps=0"), "total_steps=0"),
    Row("batch_size_0", "train", (*TRAIN, "--config.batch_size=0"), "batch_size=0"),
    Row("seed_negative", "train", (*TRAIN, "--config.seed=-1"), "seed=-1"),
    Row("crop_scale_from_0", "train", (*TRAIN, "--config.data.crop_scale=(0.0,1.0)"),
        "data.crop_scale=(0.0, 1.0)"),
    Row("crop_scale_above_1", "train", (*TRAIN, "--config.data.crop_scale=(0.5,1.5)"),
        "data.crop_scale=(0.5, 1.5)"),
    Row("crop_scale_reversed", "train", (*TRAIN, "--config.data.crop_scale=(0.9,0.2)"),
        "data.crop_scale=(0.9, 0.2)"),
    Row("patch_size_0", "train", (*TRAIN, "--config.model.patch_size=0"), "model.patch_size=0"),
    Row("depth_0", "train", (*TRAIN, "--config.model.depth=0"), "model.depth=0"),
    Row("image_size_not_divisible", "train", (*TRAIN, "--config.image_size=30"),
        "image_size=30 is not divisible by model.patch_size=8"),
    Row("mask_ratio_1", "train", (*TRAIN, "--config.mask_ratio=1.0"), "mask_ratio=1.0"),
    Row("model_variant_unknown", "train", (*TRAIN, "--config.model.variant=huge"), "'huge'"),
    Row("task_unknown", "train", (*TRAIN, "--config.task=mea"), "'mea'"),
    Row("local_device_ids_not_numbers", "train", (*TRAIN, "--local_device_ids=a,b"),
        "--local_device_ids=a,b"),
    Row("attn_pairs_flat", "train", (*D2MAE, "--config.distill.attn_pairs=(3,2)"),
        "distill.attn_pairs=(3, 2)"),
    # --- train: the command line and the config file ------------------------------------
    Row("misspelt_key", "train", (*TRAIN, "--config.log_evry=2"), "'log_evry'"),
    Row("misspelt_nested_key", "train", (*TRAIN, "--config.modle.depth=2"), "'modle'"),
    Row("value_of_another_type", "train", (*TRAIN, "--config.batch_size=abc"), "abc"),
    Row("unknown_flag", "train", (*TRAIN, "--wrkdir=x"), "wrkdir"),
    Row("positional_argument", "train", (*TRAIN, "extra"), "'extra'"),
    Row("config_syntax_error", "train", ("--config={bad}/syntax.py", "--workdir={run}"),
        "SyntaxError"),
    Row("config_get_config_raises", "train", ("--config={bad}/raises.py", "--workdir={run}"),
        "no recipe here"),
    Row("config_without_get_config", "train", ("--config={bad}/empty.py", "--workdir={run}"),
        "get_config"),
    Row("config_file_missing", "train", ("--config={bad}/missing.py", "--workdir={run}"),
        "missing.py"),
    Row("config_argument_unknown", "train", ("--config={configs}/mae_vit_tiny.py:demoo",
                                             "--workdir={run}"), "'demoo'"),
    # --- train: the workdir -------------------------------------------------------------
    Row("workdir_is_a_file", "train", (*MAE, "--workdir={file}"), "--workdir={file} is a file"),
    Row("workdir_under_a_file", "train", (*MAE, "--workdir={file}/run"), "cannot be created"),
    Row("workdir_read_only", "train", (*MAE, "--workdir={read_only}/run"), "not writable"),
    Row("workdir_empty", "train", (*MAE, "--workdir="), "--workdir is empty"),
    # --- train: data, teachers and checkpoints (after the config is checked) -------------
    Row("dataset_not_prepared", "train", ("--config={configs}/mae_vit_tiny.py",
                                          "--workdir={run}", "--config.data.data_dir={new}"),
        "imagenet2012"),
    Row("teacher_missing", "train", (*D2MAE, PAIR, "--config.distill.teacher={new}"), "{new}"),
    Row("teacher_layer_out_of_range", "train",
        (*D2MAE, "--config.distill.teacher={run}", "--config.distill.attn_pairs=((3,5),)"),
        "teacher layer 5 is outside 1..2"),
    Row("teacher_patch_size_differs", "train",
        (*D2MAE, PAIR, "--config.distill.teacher={run}", "--config.model.patch_size=4"),
        "teacher patch size 8 and student patch size 4"),
    Row("checkpoint_of_another_model", "train", (*TRAIN, "--config.total_steps=3",
                                                 "--config.model.width=48"),
        "belongs to a different model"),
    Row("resume_with_another_seed", "train", (*TRAIN, "--config.total_steps=3",
                                              "--config.seed=1"), "seed"),
    Row("resume_with_another_data_source", "train",
        (*TRAIN, "--config.total_steps=3", "--config.data.split=validation"), "data"),
    # --- bench ---------------------------------------------------------------------------
    Row("bench_steps_0", "bench", (*MAE, "--steps=0"), "--steps=0"),
    Row("bench_peak_tflops_0", "bench", (*BENCH, "--peak_tflops=0"), "--peak_tflops=0.0"),
    Row("bench_peak_tflops_negative", "bench", (*BENCH, "--peak_tflops=-5"),
        "--peak_tflops=-5.0"),
    Row("bench_torch_device_without_torch", "bench", (*BENCH, "--torch_device=cpu"),
        "--torch_device=cpu needs --torch"),
    Row("bench_torch_cuda_without_gpu", "bench", (*BENCH, "--torch", "--torch_device=cuda"),
        "--torch_device=cuda",
        (pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU is present"),)),
    Row("bench_torch_of_finetuning", "bench",
        ("--config={configs}/finetune_vit_tiny.py:demo", "--steps=1", "--torch"),
        "task='finetune'"),
    Row("bench_breakdown_with_data", "bench", (*BENCH, "--data", "--breakdown"), "--breakdown"),
    Row("bench_ops_with_data", "bench", (*BENCH, "--data", "--ops"), "--ops"),
    Row("bench_profile_dir_is_a_file", "bench", (*BENCH, "--profile_dir={file}"),
        "--profile_dir={file} is a file"),
    Row("bench_positional_argument", "bench", (*BENCH, "extra"), "'extra'"),
    Row("bench_bad_config_value", "bench", (*BENCH, "--config.model.depth=0"), "model.depth=0"),
    # --- demo ----------------------------------------------------------------------------
    Row("demo_stages_unknown", "demo", (*DEMO, "--stages=teacher,studnet"), "'studnet'"),
    Row("demo_stages_empty", "demo", (*DEMO, "--stages="), "no stage"),
    Row("demo_positional_argument", "demo", (*DEMO, "extra"), "'extra'"),
    Row("demo_workdir_is_a_file", "demo", ("--workdir={file}",), "--workdir={file} is a file"),
    Row("demo_teacher_config_value", "demo", (*DEMO, "--config.log_every=0"),
        "teacher: log_every=0"),
    Row("demo_student_width_0", "demo", (*DEMO, "--student_width=0"), "model.width=0"),
    # --- analyze -------------------------------------------------------------------------
    Row("analyze_unknown_command", "analyze", ("ckaa", "--out={new}"), "'ckaa'"),
    Row("analyze_no_command", "analyze", ("--out={new}",), "give one command"),
    Row("analyze_unknown_flag", "analyze", (*CKA, "--layerz=1"), "layerz"),
    Row("analyze_out_is_a_file", "analyze", ("reconstruct", "--model={run}", "--out={file}"),
        "--out={file} is a file"),
    Row("analyze_out_under_a_file", "analyze",
        ("reconstruct", "--model={run}", "--out={file}/figures"), "cannot be created"),
    Row("analyze_flag_of_another_command", "analyze",
        ("attention", "--model={run}", "--model_a={run}", "--out={new}"), "--model_a"),
    Row("analyze_image_size_0", "analyze", (*CKA, "--image_size=0"), "--image_size=0"),
    Row("analyze_num_batches_negative", "analyze", (*CKA, "--num_batches=-1"),
        "--num_batches=-1"),
    Row("analyze_mask_ratio_1", "analyze",
        ("reconstruct", "--model={run}", "--out={new}", "--mask_ratio=1.5"), "--mask_ratio=1.5"),
    Row("analyze_cka_batch_below_4", "analyze", (*CKA, "--batch_size=3"), "n > 3"),
    Row("analyze_layer_outside_the_model", "analyze", (*CKA, "--layers_b=7"), "0..2"),
    # --- convert -------------------------------------------------------------------------
    Row("convert_input_missing", "convert", ("from_torch", "{new}.pth", "{new}/model.npz"),
        "{new}.pth"),
    Row("convert_output_not_torch", "convert", ("to_torch", "{run}", "{new}.txt"), "{new}.txt"),
    Row("convert_num_heads_0", "convert", ("from_torch", "{file}", "{new}.npz", "--num_heads=0"),
        "--num_heads"),
    Row("convert_no_command", "convert", (), "command"),
)


# ----------------------------------------------------------------------------
# Fixtures: one runner, one prepared run, the files the rows name
# ----------------------------------------------------------------------------
@pytest.fixture(scope="session", name="runner")
def runner_fixture():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join(
             [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  runner = CliRunner(env=env)
  yield runner
  runner.close()


@pytest.fixture(scope="session", name="paths")
def paths_fixture(tmp_path_factory, runner):
  """The placeholders of the rows: a prepared run, demo data, a file, broken configs."""
  root = tmp_path_factory.mktemp("bad_input")
  paths = {"configs": CONFIGS, "data": str(root / "demo_tfds"),
           "prepared": str(root / "prepared"), "file": str(root / "a_file"),
           "bad": str(root / "configs")}
  with open(paths["file"], "w", encoding="utf-8") as f:
    f.write("not a directory\n")
  os.makedirs(paths["bad"])
  for name, text in (("syntax.py", "def get_config(:\n  pass\n"),
                     ("raises.py", "def get_config(arg=None):\n"
                                   "  raise ValueError('no recipe here')\n"),
                     ("empty.py", "RECIPE = 1\n")):
    with open(os.path.join(paths["bad"], name), "w", encoding="utf-8") as f:
      f.write(text)
  # Read-only for everyone: a mode-0555 directory stops a user, /proc/sys stops root too.
  read_only = root / "read_only"
  read_only.mkdir(mode=0o555)
  paths["read_only"] = str(read_only) if os.geteuid() != 0 else "/proc/sys"

  result = runner.run("mim_jax.train",
                      [fill(arg, {**paths, "run": paths["prepared"]}) for arg in TRAIN],
                      cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  paths["snapshot"] = snapshot(paths["prepared"])
  assert len(paths["snapshot"]) > 10  # checkpoints 1 and 2, metrics, events
  return paths


def fill(text: str, paths: dict[str, str]) -> str:
  """`text` with {name} replaced by paths[name]; unknown names are left as they are."""
  return re.sub(r"\{(\w+)\}", lambda m: paths.get(m.group(1), m.group(0)), text)


def snapshot(directory: str) -> dict[str, str]:
  """Relative path -> sha256 of the contents ('dir' for directories), of everything below."""
  found = {}
  for parent, dirnames, filenames in os.walk(directory):
    for name in dirnames:
      found[os.path.relpath(os.path.join(parent, name), directory)] = "dir"
    for name in filenames:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return found


# ----------------------------------------------------------------------------
# The rules of config_checks against the shipped configs (in-process, no runner)
# ----------------------------------------------------------------------------
def shipped_configs() -> dict[str, ml_collections.ConfigDict]:
  """Every config file, full and :demo (mim_jax.demo's configs derive from these; importing
  it here would define its flags in this process)."""
  configs = {}
  for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
    spec = importlib.util.spec_from_file_location("shipped_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full = "flowers" if path.endswith("transfer_vit_tiny.py") else None
    for arg in (full, "demo"):
      configs[f"{os.path.basename(path)}:{arg}"] = module.get_config(arg)
  return configs


def test_every_shipped_config_passes_and_every_rule_has_a_key():
  configs = shipped_configs()
  for config in configs.values():
    config_checks.check_config(config)  # raises, naming the key, if a recipe breaks a rule
  stale = [key for key, _, _ in config_checks.RULES
           if not any(config_checks.lookup(config, key)[0] for config in configs.values())]
  assert not stale, f"rules for keys no config has (moved? re-point them): {stale}"


@pytest.mark.parametrize("key, value", [
    ("keep_checkpoints", 0), ("log_every", 0), ("model.depth", 0), ("model.patch_size", 0),
    ("data.crop_scale", (0.2, 1.5)), ("data.crop_scale", (0.0, 1.0)), ("seed", -1),
    ("total_steps", 0), ("mesh.fsdp", 0), ("model.mlp_ratio", float("nan")),
    ("batch_size", True)])
def test_a_broken_rule_names_its_key_and_value(tiny_config, key, value):
  *parents, leaf = key.split(".")
  node = tiny_config
  for parent in parents:
    node = node[parent]
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(ConfigError) as info:
    config_checks.check_config(tiny_config)
  assert str(info.value).startswith(f"{key}={value!r} ")


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------
@pytest.mark.slow  # a real 2-step run per session; then a fraction of a second a row
@pytest.mark.parametrize("row", [pytest.param(row, id=row.name, marks=row.marks)
                                 for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, runner, paths, tmp_path):
  uses_run = any("{run}" in arg for arg in row.args)
  paths = {**paths, "run": str(tmp_path / "run"), "new": str(tmp_path / "new")}
  if uses_run:
    shutil.copytree(paths["prepared"], paths["run"])
  result = runner.run(f"mim_jax.{row.module}", [fill(arg, paths) for arg in row.args],
                      cwd=REPO)

  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert fill(row.message, paths) in errors[0], errors[0]
  assert "Traceback" not in result.stderr and "handle is closed" not in result.stderr, (
      result.stderr[-3000:])
  assert not re.search(r"\\[n'\"]", errors[0]), errors[0]  # no escaped quotes or newlines
  if uses_run:
    assert snapshot(paths["run"]) == paths["snapshot"]
  assert not os.path.exists(paths["new"])
