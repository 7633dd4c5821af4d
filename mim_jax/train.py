r"""Train from a config file.

  python -m mim_jax.train --config configs/mae_vit_tiny.py --workdir DIR \
      [--config.key=value ...]

Rerunning the same command with the same --workdir resumes from the latest
checkpoint. `--config.key=value` overrides are checked: an unknown key is an
error.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import cli
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value

  def run():
    task = build_task(config)
    logging.info("Config:\n%s", config)
    loop.train(config, workdir, task)

  cli.run_reporting_user_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
