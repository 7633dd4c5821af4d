"""The converter never runs code from a checkpoint file, and never exports NaN / Inf.

The payloads are real: pickles whose `__reduce__` calls `os.system`,
`subprocess.call`, `exec` or `eval` to create a marker file. Refused files must
leave no marker (and no output); `--trust_pickle` must create it, which proves
the payloads are live. Checkpoint shapes that must still convert weights-only
are built with the real objects their training scripts save (torch optimizers,
timm schedulers and CheckpointSaver, GradScaler, argparse.Namespace).
"""

import argparse
import builtins
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

from mim_jax.convert import converted, torch_format, torch_io  # noqa: E402
from mim_jax.convert.torch_pickle import UntrustedPickleError  # noqa: E402
from mim_jax.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)


class Payload:
  """Unpickles as `function(*args)`: what a malicious checkpoint holds."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def payload(kind, marker):
  """A payload that creates `marker`, and the global a refusal must name."""
  code = f"open({str(marker)!r}, 'w').close()"
  return {
      "os.system": (Payload(os.system, f"touch {shlex.quote(str(marker))}"),
                    f"{os.system.__module__}.system"),  # posix.system
      "subprocess.call": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
      "exec": (Payload(builtins.exec, code), "builtins.exec"),
      "eval": (Payload(builtins.eval, code), "builtins.eval"),
  }[kind]


def save(obj, path, legacy=False, **kwargs):
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy, **kwargs)
  return str(path)


@pytest.fixture(name="vit", scope="module")
def vit_fixture():
  """A small timm ViT (timm's init: fine for conversion, which compares bits)."""
  return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)


def assert_refused(error, path, *names):
  message = str(error.value)
  assert "\n" not in message
  assert repr(str(path)) in message and "--trust_pickle" in message, message
  for name in names:
    assert name in message, message


# ----------------------------------------------------------------------------
# Payloads: refused through the Python API, in every container and format
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".bin"])
@pytest.mark.parametrize("kind", ["os.system", "subprocess.call", "exec", "eval"])
def test_payload_never_runs(tmp_path, kind, suffix, legacy):
  marker = tmp_path / "PWNED"
  obj, name = payload(kind, marker)
  path = save(obj, tmp_path / f"evil{suffix}", legacy)
  out = tmp_path / "out.npz"
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.convert_from_torch(path, str(out), num_heads=4)
  assert_refused(error, path, name)
  assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_payload_beside_a_real_state_dict(tmp_path, vit, legacy):
  """Refused by default; trust_pickle runs it (the payload is live) and converts."""
  marker = tmp_path / "PWNED"
  evil, name = payload("eval", marker)
  path = save({"model": vit.state_dict(), "epoch": 3, "meta": {"note": [evil]}},
              tmp_path / "checkpoint.pth", legacy)
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.read_torch_checkpoint(path)
  assert_refused(error, path, name)
  assert not marker.exists()

  state_dict = torch_io.read_torch_checkpoint(path, trust_pickle=True)
  assert marker.exists()
  assert sorted(state_dict) == sorted(vit.state_dict())


def test_refusal_names_every_global_and_a_safetensors_sibling(tmp_path, vit):
  from safetensors.torch import save_file
  marker = tmp_path / "PWNED"
  (first, first_name), (second, second_name) = (payload("os.system", marker),
                                                payload("exec", marker))
  path = save({"model": vit.state_dict(), "a": first, "b": second}, tmp_path / "ckpt.pth.tar")
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.read_torch_checkpoint(path)
  assert_refused(error, path, first_name, second_name)
  assert "sits next to it" not in str(error.value)

  sibling = tmp_path / "ckpt.safetensors"
  save_file(dict(vit.state_dict()), str(sibling))
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.read_torch_checkpoint(path)
  assert f"{str(sibling)!r} sits next to it" in str(error.value)
  assert not marker.exists()


def test_stack_global_pickles_and_torchscript_are_refused(tmp_path):
  """Protocol 4 (STACK_GLOBAL, which the weights-only reader does not parse) and a
  TorchScript archive (which torch.load reads by running it)."""
  marker = tmp_path / "PWNED"
  path = save(payload("eval", marker)[0], tmp_path / "p4.pth", pickle_protocol=4)
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.read_torch_checkpoint(path)
  assert_refused(error, path, "Unsupported operand")
  assert not marker.exists()

  script = str(tmp_path / "scripted.pt")
  torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), script)
  with pytest.raises(UntrustedPickleError) as error:
    torch_io.read_torch_checkpoint(script)
  assert_refused(error, script, "TorchScript")


def test_torch_with_weights_only_bypasses_reads_safetensors_only(tmp_path, vit, monkeypatch):
  from safetensors.torch import save_file
  pth, safe = str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")
  torch.save(vit.state_dict(), pth)
  save_file(dict(vit.state_dict()), safe)
  monkeypatch.setattr(torch, "__version__", "2.5.1")
  with pytest.raises(UserError, match=r"torch 2\.5\.1 can run code .*CVE-2025-32434"):
    torch_io.read_torch_checkpoint(pth)
  assert sorted(torch_io.read_torch_checkpoint(safe)) == sorted(vit.state_dict())


# ----------------------------------------------------------------------------
# Real checkpoint shapes: weights-only, no --trust_pickle
# ----------------------------------------------------------------------------
def _trained_optimizer(model):
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
  model(torch.zeros(1, 3, 32, 32)).sum().backward()
  optimizer.step()
  return optimizer


def _timm_scheduler(optimizer):
  from timm.scheduler import create_scheduler_v2
  scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=4, warmup_epochs=1)
  scheduler.step(1)
  return scheduler


def _args():
  return argparse.Namespace(model="vit_tiny_patch16_224", blr=1.5e-4, lr=None, mask_ratio=0.75,
                            norm_pix_loss=True, output_dir="./out", distributed=False,
                            betas=[0.9, 0.95], device="cuda:0")


def mae_checkpoint(model, tmp_path):
  """facebookresearch/mae util/misc.py save_model: checkpoint-<epoch>.pth."""
  return save({"model": model.state_dict(), "optimizer": _trained_optimizer(model).state_dict(),
               "epoch": 399, "scaler": torch.amp.GradScaler("cpu").state_dict(),
               "args": _args()}, tmp_path / "checkpoint-399.pth")


def deit_checkpoint(model, tmp_path):
  """DeiT main.py: checkpoint.pth with the timm scheduler and the EMA weights."""
  optimizer = _trained_optimizer(model)
  return save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "lr_scheduler": _timm_scheduler(optimizer).state_dict(), "epoch": 299,
               "model_ema": model.state_dict(),
               "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": _args()},
              tmp_path / "checkpoint.pth")


def mae_lite_checkpoint(model, tmp_path, legacy=True):
  """MAE-Lite tools/train.py: last_epoch_ckpt.pth.tar (weights under module.model.)."""
  optimizer = _trained_optimizer(model)
  weights = {f"module.model.{k}": v for k, v in model.state_dict().items()}
  return save({"start_epoch": 400, "model": weights, "optimizer": optimizer.state_dict(),
               "scheduler": _timm_scheduler(optimizer).state_dict(), "best_top1": 0.0,
               "best_top5": 0.0, "best_top1_epoch": 0,
               "scaler": torch.amp.GradScaler("cpu").state_dict()},
              tmp_path / "last_epoch_ckpt.pth.tar", legacy)


def timm_saver_checkpoint(model, tmp_path):
  """timm train.py's CheckpointSaver, the real one."""
  from timm.utils import CheckpointSaver
  saver = CheckpointSaver(model, _trained_optimizer(model), args=_args(),
                          checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
  saver.save_checkpoint(0, metric=71.5)
  return str(tmp_path / "model_best.pth.tar")


@pytest.mark.parametrize("make", [mae_checkpoint, deit_checkpoint, mae_lite_checkpoint,
                                  timm_saver_checkpoint],
                         ids=["mae", "deit", "mae_lite", "timm_saver"])
def test_real_checkpoints_convert_weights_only(tmp_path, make):
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
  path = make(model, tmp_path)  # after an optimizer step: the weights as saved
  expected = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  summary = torch_io.convert_from_torch(path, str(tmp_path / "out.npz"), num_heads=4)
  assert "trust_pickle" not in summary.weights_entry
  direct, _ = torch_format.params_from_state_dict(expected, num_heads=4)
  assert converted.load_converted(str(tmp_path / "out.npz")).sha256 == \
      converted.content_hash(direct)


# ----------------------------------------------------------------------------
# The command line: exit status 2 and one line; --trust_pickle runs the file
# ----------------------------------------------------------------------------
def run_convert(*args):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  return subprocess.run([sys.executable, "-m", "mim_jax.convert", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def error_line(result):
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  return lines[0]


@pytest.mark.slow
def test_cli_refuses_payloads_and_trust_pickle_runs_them(tmp_path, vit):
  marker = tmp_path / "PWNED"
  evil, name = payload("os.system", marker)
  binary = save(evil, tmp_path / "pytorch_model.bin")
  line = error_line(run_convert("from_torch", binary, tmp_path / "a.npz"))
  assert repr(binary) in line and name in line and "--trust_pickle" in line
  assert not marker.exists() and not (tmp_path / "a.npz").exists()

  evil, name = payload("subprocess.call", marker)
  tar = save({"model": vit.state_dict(), "hook": evil}, tmp_path / "last_epoch_ckpt.pth.tar",
             legacy=True)
  line = error_line(run_convert("from_torch", tar, tmp_path / "b.npz", "--num_heads=4"))
  assert repr(tar) in line and name in line
  assert not marker.exists() and not (tmp_path / "b.npz").exists()

  result = run_convert("from_torch", tar, tmp_path / "b.npz", "--num_heads=4", "--trust_pickle")
  assert result.returncode == 0, result.stderr
  assert "runs any code the file holds" in result.stderr
  assert marker.exists() and (tmp_path / "b.npz").exists()


# ----------------------------------------------------------------------------
# Export: NaN / Inf are refused, nothing written
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("out_name", ["vit.safetensors", "vit.pth"])
def test_export_refuses_non_finite_params(tmp_path, vit, out_name):
  state_dict = {k: v.detach().numpy().copy() for k, v in vit.state_dict().items()}
  result = torch_format.import_state_dict(state_dict, num_heads=4)
  params = result.params
  params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"][0, :3] = np.nan
  params["encoder"]["norm"]["scale"][5] = np.inf
  npz = str(tmp_path / "diverged.npz")
  converted.save_converted(npz, params, result.arch)

  out = tmp_path / out_name
  with pytest.raises(UserError) as error:
    torch_io.export_to_torch(npz, str(out))
  message = str(error.value)
  assert repr(npz) in message and "nothing was written" in message and "\n" not in message
  assert "2 of " in message and "blocks.1.attn.qkv.weight (3 of 3,072 values)" in message
  assert "norm.weight (1 of 32 values)" in message
  assert not out.exists() and os.listdir(tmp_path) == ["diverged.npz"]

  exported = torch_format.state_dict_from_params(params, result.arch)
  with pytest.raises(UserError, match=r"refusing to write .*2 of \d+ tensors hold NaN or Inf"):
    torch_io.write_torch_state_dict(str(out), exported)
  assert not out.exists()
