r"""Train from a config file.

  python -m mim_jax.train --config configs/mae_vit_tiny.py --workdir DIR \
      [--config.key=value ...]

Rerunning the same command with the same --workdir resumes from the latest
checkpoint. `--config.key=value` overrides are checked: an unknown key is an
error.

Several processes (hosts) train one model together: on a Cloud TPU VM slice or
in a SLURM job step with several tasks this is detected; elsewhere give every
process `--coordinator_address=HOST:PORT --num_processes=N` and its own
`--process_id` (launch/local_multiprocess.py does this on one machine).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import cli, config_checks
from mim_jax.errors import ConfigError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and figures.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs "
    "outside Cloud TPU / SLURM, which are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Accelerators this process uses (e.g. 0,1,2,3); default: all, "
    "or under SLURM the task's GPU.")
_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout_s", distributed.DEFAULT_TIMEOUT_S,
    "Seconds to wait for the coordinator and all processes before giving up.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  config, workdir = _CONFIG.value, _WORKDIR.value

  def run():
    # Before anything is built, read or written: a mistake here leaves the workdir as it was.
    cli.check_no_arguments(argv)
    config_checks.check_config(config)
    config_checks.check_workdir(workdir)
    device_ids = _LOCAL_DEVICE_IDS.value
    if device_ids:
      if not all(i.strip().isdigit() for i in device_ids):
        raise ConfigError(f"--local_device_ids={','.join(device_ids)} must be device numbers, "
                          f"e.g. 0,1,2,3")
      device_ids = [int(i) for i in device_ids]
    topology = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value, device_ids, _TIMEOUT.value)
    if topology.process_index != 0:  # one log for the run; the others only warn
      logging.set_verbosity(logging.WARNING)
    task = build_task(config)
    logging.info("Config:\n%s", config)
    loop.train(config, workdir, task)

  cli.run_reporting_user_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
