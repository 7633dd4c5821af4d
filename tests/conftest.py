"""Test set-up: 8 fake CPU devices (before JAX is imported) and absl flags parsed."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


def tiny_config():
  """The demo recipe shrunk to a 2-block, 32-wide model on 32 px images (fast on CPU)."""
  from mim_jax import config_defaults
  config = config_defaults.demo_overrides(config_defaults.base_config())
  config.image_size = 32
  config.model.update(variant="", patch_size=8, width=32, depth=2, num_heads=4)
  config.model.decoder.update(width=16, depth=1, num_heads=2)
  config.batch_size = 16
  config.total_steps = 6
  config.warmup_steps = 2
  config.log_every = 1
  config.checkpoint_every = 3
  config.image_every = 0
  config.data.worker_count = 0
  return config


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
  return tiny_config()
