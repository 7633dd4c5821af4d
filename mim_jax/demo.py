r"""The main job, on a laptop CPU in minutes: MAE pre-training of ViT-Tiny on real photos.

  python -m mim_jax.demo --workdir /tmp/mim_jax_demo

Builds the embedded demo dataset (crops of photographs shipped inside the
scikit-image and scikit-learn wheels, written once as a TFDS array_record data
set under ~/.cache/mim_jax) if needed, then pre-trains `configs/mae_vit_tiny.py:demo`
and leaves in the workdir: metrics.jsonl, TensorBoard events, checkpoints and
reconstruction PNGs. Rerunning resumes. Any key can be overridden, e.g.
`--config.total_steps=50`.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import cli, config_defaults
from mim_jax.data import sources
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mim_jax_demo", "Output directory.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_defaults.demo_overrides(config_defaults.base_config()),
    "The demo pre-training config; override keys with --config.key=value.", lock_config=True)


def run_demo(config, workdir: str) -> dict[str, float]:
  """Builds the demo data if needed, pre-trains, and returns the last logged metrics."""
  cache = os.path.expanduser(config.data.data_dir or sources.DEFAULT_DEMO_DIR)
  logging.info("Demo data set in %s (built on first use)", cache)
  task = build_task(config)
  result = loop.train(config, workdir, task)
  summary = {"final": result, "metrics": os.path.join(workdir, "metrics.jsonl")}
  figure_dir = os.path.join(workdir, "reconstructions")
  if os.path.isdir(figure_dir):
    summary["reconstruction"] = os.path.join(figure_dir, sorted(os.listdir(figure_dir))[-1])
  print("MAE demo finished:", json.dumps(summary, indent=1))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_reporting_user_errors(lambda: run_demo(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
