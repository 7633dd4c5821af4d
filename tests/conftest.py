"""Test set-up: 8 fake CPU devices (before JAX is imported), JAX's persistent compilation
cache shared by the whole run (both xdist workers and the CLI subprocesses the tests
start: many tests compile the same tiny models), and absl flags parsed."""

import importlib.util
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mim_jax_test_jax_cache_{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_config(file_name, arg=None):
  """configs/<file_name>'s get_config(arg)."""
  spec = importlib.util.spec_from_file_location(
      file_name[:-len(".py")], os.path.join(CONFIGS_DIR, file_name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# The tiny model and run both helpers below make (a 2-block, 32-wide ViT on 32-px images).
TINY_RUN = {"image_size": 32, "batch_size": 16, "warmup_steps": 2, "log_every": 1,
            "image_every": 0, "model.variant": "", "model.patch_size": 8, "model.width": 32,
            "model.depth": 2, "model.num_heads": 4, "mae.decoder.width": 16,
            "mae.decoder.num_heads": 2}


def tiny_cli_flags(demo_dir, **overrides):
  """`--config.key=value` flags turning configs/mae_vit_tiny.py:demo into a tiny run
  (TINY_RUN, 8 steps); `overrides` replace any value."""
  values = dict(TINY_RUN, total_steps=8, checkpoint_every=2, **{
      "data.worker_count": 1, "data.data_dir": demo_dir})
  values.update(overrides)
  return [f"--config.{k}={v}" for k, v in values.items()]


def tiny_config():
  """The demo recipe shrunk to TINY_RUN, 6 steps (fast on CPU)."""
  from mim_jax import config_defaults
  config = config_defaults.demo_overrides(config_defaults.base_config())
  config.update_from_flattened_dict(TINY_RUN)
  config.mae.decoder.depth = 1
  config.total_steps = 6
  config.checkpoint_every = 3
  config.data.worker_count = 0
  return config


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
  return tiny_config()


@pytest.fixture(scope="session", name="demo_data_dir")
def demo_data_dir_fixture(tmp_path_factory):
  """A data_dir holding the demo data set, built once per test process (6 s a build);
  tests only read it (the digits set may be added to it on first use)."""
  from mim_jax.data.sources import build_demo_dataset
  path = str(tmp_path_factory.mktemp("shared_demo_tfds"))
  build_demo_dataset(path)
  return path


def make_teacher(path, *, width=48, depth=3, num_heads=6, patch_size=8, image_size=32,
                 seed=1):
  """A converted (.npz) teacher ViT with random, non-trivial weights; returns its path."""
  import jax
  import numpy as np
  from mim_jax.convert import save_converted
  from mim_jax.models.vit import VisionTransformer
  arch = dict(patch_size=patch_size, image_size=image_size, width=width, depth=depth,
              num_heads=num_heads, source="test teacher")
  model = VisionTransformer(patch_size=patch_size, width=width, depth=depth,
                            num_heads=num_heads)
  images = np.zeros((1, image_size, image_size, 3), np.float32)
  params = model.init(jax.random.PRNGKey(seed), images)["params"]
  # Perturb every leaf so LayerNorm scales/biases are not trivially 1/0.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  leaves = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
            for x in leaves]
  save_converted(str(path), {"encoder": jax.tree.unflatten(treedef, leaves)}, arch)
  return str(path)


def tiny_distill_config(teacher_path, *, d2=True):
  """tiny_config() distilled from a 3-block `make_teacher` teacher.

  D²-MAE: a 2-block student plus the attention-only block 3 (distilled to teacher
  layer 3), decoder on block 1. D-MAE: student layer 2 <-> teacher layer 3.
  """
  from mim_jax import config_defaults
  config = config_defaults.distillation_overrides(tiny_config(), decoupled=d2)
  config.mae.decoder_layer = 1 if d2 else None
  config.distill.teacher = str(teacher_path)
  config.distill.teacher_variant = ""
  config.distill.attn_pairs = ((3, 3),) if d2 else ((2, 3),)
  return config
