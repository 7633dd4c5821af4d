"""What a run promises about its workdir: no diverged state is ever saved, an unreadable
checkpoint never blocks a resume (and is never deleted), one run per workdir, Ctrl-C
saves, a resume never duplicates metrics, another input pipeline is one line."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_cli_flags, tiny_config
from mim_jax import workdir as layout
from mim_jax.convert import load_converted
from mim_jax.errors import CheckpointMismatchError, TrainingDivergedError
from mim_jax.tasks.registry import build_task
from mim_jax.trainer import checkpoint, lock, loop, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module", name="demo_dir")
def demo_dir_fixture(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_tfds"))


def config_for(demo_dir, **overrides):
  config = tiny_config()
  config.data.data_dir = demo_dir
  config.total_steps, config.checkpoint_every, config.keep_checkpoints = STEPS, 1, 10
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.fixture(scope="module", name="base_run")
def base_run_fixture(tmp_path_factory, demo_dir):
  """A finished 4-step run with a checkpoint at every step; its metrics are the reference."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  config = config_for(demo_dir)
  loop.train(config, workdir, build_task(config))
  return workdir


def copy_of(run, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(run, target)
  return target


def losses(workdir):
  return [(r["step"], r["loss"]) for r in layout.read_metrics(workdir) if "loss" in r]


def tree_listing(directory):
  return sorted((os.path.relpath(os.path.join(d, f), directory),
                 os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(directory) for f in files)


def non_finite_arrays(step_dir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  return sum(not np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


# ----------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------
def test_a_diverged_state_is_never_saved(tmp_path, demo_dir):
  # lr = inf from step 1 (base_lr * 16 / 256 overflows float32): the loss of step 1 is
  # computed before the update and is finite, the state after it is not.
  config = config_for(demo_dir, total_steps=2, warmup_steps=0, **{"optimizer.base_lr": 1e40})
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingDivergedError, match=r"the update made the parameters or "
                     r"optimizer state non-finite \(loss [0-9.]+\) at step 1; stopped without "
                     r"saving \(no checkpoint was written\)"):
    loop.train(config, workdir, build_task(config))
  assert layout.finalized_steps(layout.checkpoints_dir(workdir)) == []


def test_the_checkpoint_named_last_good_is_finite(tmp_path, base_run, demo_dir):
  workdir = copy_of(base_run, tmp_path)
  config = config_for(demo_dir, total_steps=STEPS + 2, warmup_steps=0,
                      **{"optimizer.base_lr": 1e40})
  with pytest.raises(TrainingDivergedError, match=f"at step {STEPS + 1}; .*last good "
                     f"checkpoint is step {STEPS} in"):
    loop.train(config, workdir, build_task(config))
  assert layout.finalized_steps(layout.checkpoints_dir(workdir))[-1] == STEPS
  assert non_finite_arrays(os.path.join(workdir, "checkpoints", str(STEPS))) == 0


# ----------------------------------------------------------------------------
# Unreadable checkpoints
# ----------------------------------------------------------------------------
def truncate_tensors(step_dir):
  # Every data file of the OCDBT store: the processes' ones and, once orbax has merged
  # them, the root's (which can hold small arrays inline).
  paths = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert paths, step_dir
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def empty_file(path):
  open(path, "w").close()


DAMAGE = {
    "truncated tensor files": truncate_tensors,
    "emptied metadata": lambda d: empty_file(os.path.join(d, "meta", "metadata")),
    "emptied state metadata": lambda d: empty_file(os.path.join(d, "state", "_METADATA")),
    "truncated manifest": lambda d: empty_file(os.path.join(d, "state", "manifest.ocdbt")),
}


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_resume_is_exact(
    tmp_path, base_run, demo_dir, caplog):
  workdir = copy_of(base_run, tmp_path)
  latest = os.path.join(workdir, "checkpoints", str(STEPS))
  truncate_tensors(latest)
  damaged = tree_listing(latest)
  config = config_for(demo_dir)
  with caplog.at_level("WARNING"):
    loop.train(config, workdir, build_task(config))
  moved = os.path.join(workdir, "unreadable_checkpoints", str(STEPS))
  assert (f"The checkpoint at step {STEPS} in {os.path.join(workdir, 'checkpoints')} does not "
          f"restore") in caplog.text and f"moved it to {moved}" in caplog.text
  assert tree_listing(moved) == damaged  # every byte kept
  # Resumed from the step before and redid the last one: same loss, logged once.
  assert losses(workdir) == losses(base_run)


@pytest.mark.parametrize("damage", [k for k in DAMAGE if k != "truncated tensor files"] +
                         ["stray empty step directory"])
def test_every_kind_of_damage_falls_back_to_the_checkpoint_before(tmp_path, base_run, demo_dir,
                                                                 damage):
  workdir = copy_of(base_run, tmp_path)
  newest = STEPS
  if damage == "stray empty step directory":
    newest = STEPS + 3
    os.makedirs(os.path.join(workdir, "checkpoints", str(newest)))
  else:
    DAMAGE[damage](os.path.join(workdir, "checkpoints", str(STEPS)))
  config = config_for(demo_dir)
  task = build_task(config)
  tx, _ = loop.make_optimizer(config, jax.eval_shape(task.init_params, jax.random.PRNGKey(0)),
                              STEPS, 2)
  from mim_jax.trainer import sharding  # pylint: disable=import-outside-toplevel
  abstract, _, _ = loop.prepare_state(task, tx, config, sharding.make_mesh(-1, 1))
  ckpt = checkpoint.Checkpointer(workdir, keep=10, async_save=False)
  try:
    step, (state, _) = ckpt.restore_latest({}, lambda s: ckpt.restore(s, abstract))
  finally:
    ckpt.close()
  expected = STEPS if damage == "stray empty step directory" else STEPS - 1
  assert step == expected and int(state["step"]) == expected
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", str(newest)))
  assert not os.path.exists(os.path.join(workdir, "checkpoints", str(newest)))


def test_readers_skip_an_unreadable_checkpoint_and_leave_it(tmp_path, base_run, monkeypatch):
  workdir = copy_of(base_run, tmp_path)
  latest = os.path.join(workdir, "checkpoints", str(STEPS))
  truncate_tensors(latest)
  # The warning is recorded at its source: pytest's log capture misses absl records once
  # another test in the same worker has set absl's logging up.
  warnings = []
  monkeypatch.setattr(layout.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  loaded = load_converted(workdir)
  assert any(w.startswith(f"Skipped an unreadable checkpoint (left in place): {latest!r}")
             for w in warnings), warnings
  assert loaded.arch["source"] == os.path.join(workdir, "checkpoints", str(STEPS - 1))
  assert os.path.isdir(latest)


# ----------------------------------------------------------------------------
# Resume with another input pipeline
# ----------------------------------------------------------------------------
def test_resume_with_another_seed_is_one_line_and_changes_nothing(tmp_path, base_run, demo_dir):
  workdir = copy_of(base_run, tmp_path)
  before = tree_listing(workdir)
  config = config_for(demo_dir, total_steps=STEPS + 1, seed=1)
  with pytest.raises(CheckpointMismatchError, match=r"^the checkpoint at step 4 in .* was "
                     r"written by another input pipeline \(grain: Sampler in checkpoint does not "
                     r"match dataloader sampler; .*\); resume with the original settings") as info:
    loop.train(config, workdir, build_task(config))
  assert "\n" not in str(info.value)
  assert tree_listing(workdir) == before


# ----------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------
def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path, base_run,
                                                                    demo_dir):
  workdir = copy_of(base_run, tmp_path)
  before = tree_listing(workdir)
  config = config_for(demo_dir, total_steps=STEPS + 1)
  with lock.WorkdirLock(workdir):
    holder = json.loads(open(os.path.join(workdir, "lock")).read())
    with pytest.raises(lock.WorkdirInUseError, match=(
        f"^the workdir '{workdir}' is in use by another run \\(host {socket.gethostname()}, "
        f"pid {os.getpid()}, started {holder['started_utc']}; lock file .*\\); wait for it")):
      loop.train(config, workdir, build_task(config))
    assert tree_listing(workdir) == sorted(before + [("lock", os.path.getsize(
        os.path.join(workdir, "lock")))])
  assert tree_listing(workdir) == before  # released


def write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
               "started_utc": "then", "heartbeat": time.time(), "id": "other", **record}, f)


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("holder, taken", [
    (dict(pid="dead"), True),  # this host, process gone
    (dict(host="elsewhere", heartbeat=time.time() - 3600), True),  # heartbeat an hour old
    (dict(host="elsewhere"), False),  # another host, heartbeat fresh
])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, holder, taken, caplog):
  workdir = str(tmp_path / "run")
  if holder.get("pid") == "dead":
    holder["pid"] = dead_pid()
  write_lock(workdir, **holder)
  held = lock.WorkdirLock(workdir)
  if not taken:
    with pytest.raises(lock.WorkdirInUseError, match="host elsewhere"):
      held.acquire()
    return
  with caplog.at_level("WARNING"):
    held.acquire()
  assert "Took over the lock of" in caplog.text
  assert json.load(open(os.path.join(workdir, "lock")))["pid"] == os.getpid()
  held.release()
  assert not os.path.exists(os.path.join(workdir, "lock"))


# ----------------------------------------------------------------------------
# Metrics of a resumed run
# ----------------------------------------------------------------------------
def test_a_resumed_writer_drops_the_records_it_repeats(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "lo')  # a line torn by a kill
  time.sleep(0.01)  # the new event file gets a later name
  writer = metrics.MetricWriter(workdir, start_step=3)  # resumed from the checkpoint at 3
  for step in range(4, 6):
    writer.write(step, {"loss": 10.0 * step})
  writer.close()
  assert [(r["step"], r["loss"]) for r in layout.read_metrics(workdir)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  assert open(os.path.join(workdir, "metrics.jsonl")).read().endswith("}\n")
  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


# ----------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------
def cli_flags(demo_dir, **overrides):
  """A tiny run long enough to be interrupted (no checkpoint before it is)."""
  return tiny_cli_flags(demo_dir, **{"total_steps": 10_000, "checkpoint_every": 10_000,
                                     **overrides})


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_in_one_line_and_a_second_exits_at_once(tmp_path, demo_dir):
  """Also: the rerun resumes, and a resumed run that fails ends with its error line."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen(
      [sys.executable, "-m", "mim_jax.train", f"--config={REPO}/configs/mae_vit_tiny.py:demo",
       f"--workdir={workdir}"] + cli_flags(demo_dir), env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and len(layout.read_metrics(workdir)) < 2:
    time.sleep(0.1)
  os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the trainer and its grain worker
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  saved = layout.finalized_steps(layout.checkpoints_dir(workdir))
  assert len(saved) == 1 and saved[0] >= 2
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  # (grain's resource tracker may still warn about leaked shared memory: the loader's, not
  # the interrupt's.)
  assert stderr.splitlines().count(
      f"interrupted (Ctrl-C): saved step {saved[0]} in {workdir}/checkpoints; rerun the same "
      f"command to resume") == 1
  assert not os.path.exists(os.path.join(workdir, "lock"))

  # The rerun resumes there; when it then fails (here: it diverges), the error is its last
  # line: the input pipeline's worker is stopped before exit, not torn down after it.
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.train", f"--config={REPO}/configs/mae_vit_tiny.py:demo",
       f"--workdir={workdir}"] + cli_flags(demo_dir, warmup_steps=0,
                                           **{"optimizer.base_lr": 1e40}),
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "handle is closed" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: the update made the parameters or optimizer state non-finite "
                    f"(loss {errors[0].split('(loss ')[1].split(')')[0]}) at step "
                    f"{saved[0] + 1}; stopped without saving (the last good checkpoint is step "
                    f"{saved[0]} in {workdir}/checkpoints); lower optimizer.base_lr or check "
                    f"the data"]

  # A second Ctrl-C while the first is being handled ends the process at once.
  script = ("import os, signal, time\n"
            "from mim_jax.trainer import signals\n"
            "stop = signals.StopSignals()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "assert stop.check(1)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(60)\n")
  started = time.time()
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
  assert result.returncode == 130 and time.time() - started < 60
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: interrupted again: exiting at once, without saving")
