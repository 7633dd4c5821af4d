r"""The paper's flow on a laptop CPU in minutes: an MAE teacher, then D²-MAE vs MAE students.

  python -m mim_jax.demo --workdir /tmp/mim_jax_demo

Builds the embedded demo dataset (crops of photographs shipped inside the
scikit-image and scikit-learn wheels, written once as a TFDS array_record data
set under ~/.cache/mim_jax) if needed, then runs three pre-trainings on it:

  1. teacher/       MAE ViT-Tiny (`configs/mae_vit_tiny.py:demo`, 192 wide, 12 blocks);
  2. d2mae_student/ a half-width student (96 wide, 6 heads) pre-trained with D²-MAE
                    from the frozen teacher (13th attention-only block distilled to
                    the teacher's last layer, decoder on block 8);
  3. mae_student/   the same student with plain MAE, for comparison,

and prints their losses side by side. Each workdir holds metrics.jsonl,
TensorBoard events, checkpoints and reconstruction PNGs; rerunning resumes.
`--config.key=value` overrides the teacher's config; the data, schedule and
logging keys carry over to the students, whose size has its own flags.
"""

import json
import os

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import cli, config_defaults
from mim_jax.data import sources
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mim_jax_demo", "Output directory.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_defaults.demo_overrides(config_defaults.base_config()),
    "The teacher's MAE demo config; override keys with --config.key=value.", lock_config=True)
_STUDENT_WIDTH = flags.DEFINE_integer("student_width", 96, "Width of the two students.")
_STUDENT_HEADS = flags.DEFINE_integer("student_heads", 6, "Attention heads of the students.")
_STAGES = flags.DEFINE_list("stages", ["teacher", "d2mae_student", "mae_student"],
                            "Which stages to run (each resumes or skips if already done).")

STAGES = ("teacher", "d2mae_student", "mae_student")


def student_config(teacher: ml_collections.ConfigDict, teacher_dir: str, method: str, *,
                   width: int, num_heads: int) -> ml_collections.ConfigDict:
  """The teacher's recipe with a smaller encoder; D²-MAE distils from `teacher_dir`."""
  config = ml_collections.ConfigDict(teacher.to_dict())
  depth = teacher.model.depth or 12
  config.model.update(variant="", width=width, num_heads=num_heads, depth=depth)
  if method == "d2mae":
    config = config_defaults.distillation_overrides(config, decoupled=True)
    config.model.decoder_layer = max(1, round(depth * 2 / 3))  # block 8 of 12
    config.distill.attn_pairs = ((depth + 1, depth),)
    config.distill.teacher = teacher_dir
    config.distill.teacher_variant = ""
  return config


def last_metrics(workdir: str) -> dict[str, float]:
  """The last record of the run's metrics.jsonl (also for a stage finished earlier)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  return json.loads(lines[-1]) if lines else {}


def last_reconstruction(workdir: str) -> str | None:
  figure_dir = os.path.join(workdir, "reconstructions")
  if not os.path.isdir(figure_dir) or not os.listdir(figure_dir):
    return None
  return os.path.join(figure_dir, sorted(os.listdir(figure_dir))[-1])


def run_demo(teacher_config: ml_collections.ConfigDict, workdir: str, *,
             student_width: int = 96, student_heads: int = 6,
             stages: tuple[str, ...] = STAGES) -> dict[str, dict[str, float]]:
  """Runs the stages asked for and returns each one's last logged metrics and figure."""
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise app.UsageError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
  cache = os.path.expanduser(teacher_config.data.data_dir or sources.DEFAULT_DEMO_DIR)
  logging.info("Demo data set in %s (built on first use)", cache)
  teacher_dir = os.path.join(workdir, "teacher")
  configs = {
      "teacher": teacher_config,
      "d2mae_student": student_config(teacher_config, teacher_dir, "d2mae",
                                      width=student_width, num_heads=student_heads),
      "mae_student": student_config(teacher_config, teacher_dir, "mae",
                                    width=student_width, num_heads=student_heads),
  }
  results = {}
  for stage in STAGES:
    if stage not in stages:
      continue
    logging.info("=== Demo stage %s (%s) in %s", stage, configs[stage].task,
                 os.path.join(workdir, stage))
    stage_dir = os.path.join(workdir, stage)
    loop.train(configs[stage], stage_dir, build_task(configs[stage]))
    results[stage] = {**last_metrics(stage_dir),
                      "reconstruction": last_reconstruction(stage_dir)}
  print_summary(results, workdir)
  return results


def print_summary(results: dict[str, dict], workdir: str) -> None:
  print(f"\nmim_jax demo finished in {workdir}")
  print(f"{'stage':16s} {'step':>5s} {'loss':>8s} {'loss_rec':>9s} {'loss_attn':>10s}  "
        f"reconstruction")
  for stage, metrics in results.items():
    attn = metrics.get("loss_attn")
    print(f"{stage:16s} {metrics.get('step', 0):5d} {metrics.get('loss', float('nan')):8.4f} "
          f"{metrics.get('loss_rec', float('nan')):9.4f} "
          f"{'' if attn is None else f'{attn:10.4f}':>10s}  {metrics.get('reconstruction')}")
  print("The students have the same size, data and steps; D²-MAE's reconstruction comes "
        "from block 8, its blocks 9-12 learn from the teacher's attention alone.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_reporting_user_errors(lambda: run_demo(
      _CONFIG.value, _WORKDIR.value, student_width=_STUDENT_WIDTH.value,
      student_heads=_STUDENT_HEADS.value, stages=tuple(_STAGES.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
