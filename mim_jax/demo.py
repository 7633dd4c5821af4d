r"""The study's flow on a laptop CPU: an MAE teacher, then D²-MAE vs MAE, SimMIM and MaskFeat.

  python -m mim_jax.demo --workdir /tmp/mim_jax_demo

Builds the embedded demo dataset (crops of photographs shipped inside the
scikit-image and scikit-learn wheels, written once as a TFDS array_record data
set under ~/.cache/mim_jax) if needed, then runs three pre-trainings on it:

  1. teacher/       MAE ViT-Tiny (`configs/mae_vit_tiny.py:demo`, 192 wide, 12 blocks);
  2. d2mae_student/ a half-width student (96 wide, 6 heads) pre-trained with D²-MAE
                    from the frozen teacher (13th attention-only block distilled to
                    the teacher's last layer, decoder on block 8);
  3. mae_student/   the same student with plain MAE, for comparison,
  4. simmim_student/, maskfeat_student/: the same student pre-trained with SimMIM
                    and MaskFeat (configs/simmim_vit_tiny.py:demo,
                    configs/maskfeat_vit_tiny.py:demo: their own recipes and ViT options),
  5. evaluation on scikit-learn's digits (a real labelled set shipped offline,
     upsampled to 32 px): each student and a randomly initialised one ("scratch")
     get a k-NN and a ridge probe of their frozen features, a trained linear
     probe (MAE's BatchNorm + linear head, linear_probe_<name>/) and a short
     fine-tuning run (finetune_<name>/),

and prints their losses and accuracies side by side. Each workdir holds metrics.jsonl,
TensorBoard events, checkpoints and reconstruction PNGs; rerunning resumes.
`--config.key=value` overrides the teacher's config; the data, schedule and
logging keys carry over to the students, whose size has its own flags.
"""

import importlib.util
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import cli, config_checks, config_defaults, io
from mim_jax import workdir as layout
from mim_jax.convert import converted
from mim_jax.data import sources
from mim_jax.analysis import quick_probe
from mim_jax.errors import ConfigError, UserError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mim_jax_demo", "Output directory.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_defaults.demo_overrides(config_defaults.base_config()),
    "The teacher's MAE demo config; override keys with --config.key=value.", lock_config=True)
_STUDENT_WIDTH = flags.DEFINE_integer("student_width", 96, "Width of the two students.")
_STUDENT_HEADS = flags.DEFINE_integer("student_heads", 6, "Attention heads of the students.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100,
                                       "Steps of each short fine-tuning run on the digits.")
_PROBE_STEPS = flags.DEFINE_integer("probe_steps", 100,
                                    "Steps of each linear-probe run on the digits.")
STAGES = ("teacher", "d2mae_student", "mae_student", "simmim_student", "maskfeat_student",
          "evaluate")
PRETRAINING = STAGES[:-1]
EVALUATED = ("d2mae_student", "mae_student", "simmim_student", "maskfeat_student", "scratch")
# Pre-training methods with a recipe of their own, read from the repository's configs/.
RECIPE_FILES = {"simmim": "simmim_vit_tiny.py", "maskfeat": "maskfeat_vit_tiny.py"}
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_STAGES = flags.DEFINE_list("stages", list(STAGES),
                            "Which stages to run (each resumes or skips if already done).")


def student_config(teacher: ml_collections.ConfigDict, teacher_dir: str, method: str, *,
                   width: int, num_heads: int) -> ml_collections.ConfigDict:
  """The teacher's recipe with a smaller encoder; D²-MAE distils from `teacher_dir`;
  SimMIM and MaskFeat take their own demo recipes with the teacher's data, image size,
  patch, schedule and cadence."""
  depth = teacher.model.depth or 12
  if method in RECIPE_FILES:
    config = method_demo_config(method)
    crop_scale = config.data.crop_scale  # the method's own
    config.data = ml_collections.ConfigDict(teacher.data.to_dict())
    config.data.crop_scale = crop_scale
    for key in ("image_size", "seed", "total_steps", "total_epochs", "warmup_steps",
                "warmup_epochs", "log_every", "checkpoint_every", "keep_checkpoints",
                "batch_size"):
      config[key] = teacher[key]
    config.image_every = teacher.image_every if config.image_every else 0
    config.model.update(variant="", width=width, num_heads=num_heads, depth=depth,
                        patch_size=teacher.model.patch_size)
    return config
  config = ml_collections.ConfigDict(teacher.to_dict())
  config.model.update(variant="", width=width, num_heads=num_heads, depth=depth)
  if method == "d2mae":
    config = config_defaults.distillation_overrides(config, decoupled=True)
    config.mae.decoder_layer = max(1, round(depth * 2 / 3))  # block 8 of 12
    config.distill.attn_pairs = ((depth + 1, depth),)
    config.distill.teacher = teacher_dir
    config.distill.teacher_variant = ""
  return config


def method_demo_config(method: str) -> ml_collections.ConfigDict:
  """`configs/<method>_vit_tiny.py:demo`, read from the repository."""
  path = os.path.join(CONFIGS_DIR, RECIPE_FILES[method])
  if not os.path.exists(path):
    raise UserError(f"the demo reads {path} (run it from a clone of the repository, "
                    f"installed with pip install -e)")
  spec = importlib.util.spec_from_file_location(f"{method}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("demo")


def last_metrics(workdir: str) -> dict[str, float]:
  """The last record of the run's metrics.jsonl (also for a stage finished earlier)."""
  return layout.last_metrics(workdir)


def last_reconstruction(workdir: str) -> str | None:
  return layout.latest_figure(workdir)


def digits_config(recipe: ml_collections.ConfigDict, student: ml_collections.ConfigDict,
                  data_dir: str | None, init: str, steps: int) -> ml_collections.ConfigDict:
  """A digits recipe (fine-tuning or linear probe) for a student's architecture, from
  `init` ('' = random init)."""
  config = recipe
  model = student.model
  config.model.update(variant="", width=model.width, depth=model.depth,
                      num_heads=model.num_heads, patch_size=model.patch_size,
                      **{key: model[key] for key in ARCHITECTURE_OPTIONS})
  config.data.data_dir = data_dir
  config.init = init
  config.total_steps = steps
  config.warmup_steps = max(1, steps // 10)
  config.eval_every = steps
  config.checkpoint_every = steps
  config.seed = student.seed
  return config


# The student's ViT options that fine-tuning and probing must rebuild to load its weights.
ARCHITECTURE_OPTIONS = ("qkv_bias", "rel_pos_bias", "layer_scale", "abs_pos_embed")


def finetune_config(student: ml_collections.ConfigDict, data_dir: str | None, init: str,
                    steps: int) -> ml_collections.ConfigDict:
  recipe = config_defaults.finetune_demo_overrides(config_defaults.finetune_config())
  return digits_config(recipe, student, data_dir, init, steps)


def linear_probe_config(student: ml_collections.ConfigDict, data_dir: str | None, init: str,
                        steps: int) -> ml_collections.ConfigDict:
  recipe = config_defaults.linear_probe_demo_overrides(config_defaults.linear_probe_config())
  return digits_config(recipe, student, data_dir, init, steps)


def evaluate_students(configs: dict[str, ml_collections.ConfigDict], workdir: str,
                      finetune_steps: int, probe_steps: int) -> dict[str, dict[str, float]]:
  """Probes and short fine-tuning on the digits for each student and a random-init one."""
  scratch_task = build_task(configs["mae_student"])
  student = configs["mae_student"]
  scratch = converted.Converted(
      params=jax.device_get(scratch_task.init_params(jax.random.PRNGKey(student.seed))),
      arch=converted.arch_from_config(student.to_dict(), source="random init"),
      sha256="", path="random init")
  data_dir = configs["teacher"].data.data_dir
  results = {}
  for name in EVALUATED:
    source = scratch if name == "scratch" else io.join(workdir, name)
    init = "" if name == "scratch" else source
    student = configs["mae_student" if name == "scratch" else name]
    ft = finetune_config(student, data_dir, init, finetune_steps)
    logging.info("=== Evaluating %s on the digits", name)
    probes = quick_probe.quick_probe(source, ft.data, ft.image_size)
    lp = linear_probe_config(student, data_dir, init, probe_steps)
    if name == "maskfeat_student":
      lp.model.pool = "gap"  # MaskFeat's encoder has no final norm to read the cls token with
    lp_dir = io.join(workdir, f"linear_probe_{name}")
    loop.train(lp, lp_dir, build_task(lp))
    ft_dir = io.join(workdir, f"finetune_{name}")
    loop.train(ft, ft_dir, build_task(ft))
    results[name] = {**probes, "linear_top1": last_metrics(lp_dir).get("val_top1"),
                     "finetune_top1": last_metrics(ft_dir).get("val_top1")}
  return results


def parse_stages(names: Sequence[str]) -> tuple[str, ...]:
  """The --stages list, checked: one or more of STAGES."""
  names = tuple(name.strip() for name in names)
  unknown = [name for name in names if name not in STAGES]
  if unknown or not names:
    given = f"unknown stage {', '.join(map(repr, unknown))}" if unknown else "no stage"
    raise UserError(f"--stages={','.join(names)}: {given}; choose one or more of "
                    f"{','.join(STAGES)}")
  return names


def run_demo(teacher_config: ml_collections.ConfigDict, workdir: str, *,
             student_width: int = 96, student_heads: int = 6, finetune_steps: int = 100,
             probe_steps: int = 100, stages: tuple[str, ...] = STAGES
             ) -> dict[str, dict[str, float]]:
  """Runs the stages asked for and returns each one's last logged metrics and figure."""
  stages = parse_stages(stages)
  config_checks.check_workdir(workdir)
  cache = io.absolute(teacher_config.data.data_dir or sources.DEFAULT_DEMO_DIR)
  logging.info("Demo data set in %s (built on first use)", cache)
  teacher_dir = io.join(workdir, "teacher")
  configs = {"teacher": teacher_config}
  for stage in PRETRAINING[1:]:
    configs[stage] = student_config(teacher_config, teacher_dir, stage.split("_")[0],
                                    width=student_width, num_heads=student_heads)
  for stage, config in configs.items():  # all of them before the first stage trains
    try:
      config_checks.check_config(config)
    except ConfigError as error:
      raise ConfigError(f"{stage}: {error}") from None
  results = {}
  for stage in PRETRAINING:
    if stage not in stages:
      continue
    logging.info("=== Demo stage %s (%s) in %s", stage, configs[stage].task,
                 io.join(workdir, stage))
    stage_dir = io.join(workdir, stage)
    loop.train(configs[stage], stage_dir, build_task(configs[stage]))
    results[stage] = {**last_metrics(stage_dir),
                      "reconstruction": last_reconstruction(stage_dir)}
  evaluation = (evaluate_students(configs, workdir, finetune_steps, probe_steps)
                if "evaluate" in stages else {})
  print_summary(results, evaluation, workdir)
  return {**results, **{f"eval_{k}": v for k, v in evaluation.items()}}


def print_summary(results: dict[str, dict], evaluation: dict[str, dict], workdir: str) -> None:
  print(f"\nmim_jax demo finished in {workdir}")
  if results:
    print(f"{'pre-training':16s} {'step':>5s} {'loss':>8s} {'loss_rec':>9s} {'loss_attn':>10s}  "
          f"reconstruction")
  for stage, metrics in results.items():
    attn, rec = metrics.get("loss_attn"), metrics.get("loss_rec", metrics.get("loss_hog"))
    print(f"{stage:16s} {metrics.get('step', 0):5d} {metrics.get('loss', float('nan')):8.4f} "
          f"{'' if rec is None else f'{rec:9.4f}':>9s} "
          f"{'' if attn is None else f'{attn:10.4f}':>10s}  {metrics.get('reconstruction')}")
  if results:
    print("The students have the same size, data and steps; D²-MAE's reconstruction comes "
          "from block 8, its blocks 9-12 learn from the teacher's attention alone. The "
          "losses of different methods are not comparable (MAE: normalised-pixel MSE, SimMIM: "
          "pixel L1, MaskFeat: HOG MSE in loss_rec's column).")
  if evaluation:
    print(f"\n{'digits top-1 (%)':16s} {'k-NN':>7s} {'ridge':>7s} {'linear':>7s} "
          f"{'fine-tune':>10s}")
    for name, metrics in evaluation.items():
      linear, finetune = metrics.get("linear_top1"), metrics.get("finetune_top1")
      print(f"{name:16s} {metrics['knn_top1']:7.1f} {metrics['ridge_top1']:7.1f} "
            f"{'' if linear is None else f'{linear:7.1f}':>7s} "
            f"{'' if finetune is None else f'{finetune:10.1f}':>10s}")
    print("k-NN / ridge: closed-form probes of frozen features (mean patch token); linear: "
          "MAE's linear probe (cls token, BatchNorm + linear head, trained); fine-tune: a short "
          "run from the weights (scratch: random init). 355 validation digits, chance 10%.")


def main(argv):
  def run():
    cli.check_no_arguments(argv)
    run_demo(_CONFIG.value, _WORKDIR.value, student_width=_STUDENT_WIDTH.value,
             student_heads=_STUDENT_HEADS.value, finetune_steps=_FINETUNE_STEPS.value,
             probe_steps=_PROBE_STEPS.value, stages=tuple(_STAGES.value))

  cli.run_reporting_user_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
