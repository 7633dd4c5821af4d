"""Reading pickled PyTorch checkpoints (.pth, .pth.tar, .bin) without running their code.

A `.pth` is a pickle, and unpickling calls whatever functions the file names
(`os.system`, `subprocess.call`, `exec`, ...). So a pickle is read with
`torch.load(weights_only=True)`, which builds tensors, containers and numbers
and nothing else, plus the few harmless classes real training checkpoints hold
(`SAFE_GLOBALS`, allowed for that one call). A file holding anything else is
refused with one line naming the file, what it holds and what to do.
`trust_pickle=True` (`--trust_pickle`) is the only way to full unpickling.
`.safetensors` files hold tensors only and need none of this.
"""

import _compat_pickle
import argparse
import pickle
import re
from typing import IO, Any

from absl import logging

from mim_jax import io
from mim_jax.errors import UserError

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

# The classes besides tensors, containers and numbers that real checkpoints pickle,
# read without --trust_pickle. Each is rebuilt by `cls.__new__` and a `__dict__`
# update, which runs none of the file's code; what it holds obeys the same rules.
# * argparse.Namespace: the run's `args`, in facebookresearch/mae util/misc.py
#   save_model (checkpoint-<epoch>.pth), DeiT main.py (checkpoint.pth,
#   best_checkpoint.pth) and timm's CheckpointSaver (train.py's checkpoints).
# Nothing else is needed by the official MAE release ({'model': state_dict}), nor by
# MAE-Lite's tools/train.py `.pth.tar` (start_epoch, best_top1/5, best_top1_epoch,
# and model / optimizer / timm scheduler / GradScaler state_dicts: tensors, numbers,
# strings, lists, tuples and dicts only), nor by the optimizer, timm scheduler and
# GradScaler state_dicts beside `args` in the others.
SAFE_GLOBALS = (argparse.Namespace,)
# torch.load(weights_only=True) has known bypasses before these releases:
# CVE-2025-32434 (< 2.6, code execution) and CVE-2026-24747 (< 2.10, memory corruption).
SAFE_TORCH = (2, 10)


class UntrustedPickleError(UserError):
  """A pickle that a weights-only load refuses: reading it could run code from the file."""


def import_torch() -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the PyTorch converter needs torch, timm and safetensors: "
                    "pip install -e '.[torch]'") from None
  return torch


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def load(path: str, *, trust_pickle: bool = False) -> Any:
  """The object pickled in `path` (local or gs://), read weights-only unless trusted."""
  torch = import_torch()
  if not trust_pickle and _torch_version(torch) < SAFE_TORCH:
    raise UserError(f"torch {torch.__version__} can run code from a .pth even with "
                    f"weights_only=True (CVE-2025-32434, CVE-2026-24747); install "
                    f"torch>={'.'.join(map(str, SAFE_TORCH))} (pip install -e '.[torch]') "
                    f"or convert a {SAFETENSORS_SUFFIX} file")
  with io.open_read(path) as f:
    if trust_pickle:
      logging.warning("trust_pickle: reading %s with full unpickling (weights_only=False), "
                      "which runs any code the file holds", path)
      try:
        return torch.load(f, map_location="cpu", weights_only=False)
      except Exception as error:
        raise UserError(f"cannot read {path!r} as a PyTorch checkpoint "
                        f"({first_line(error)})") from None
    try:
      with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
      found = _refused_globals(torch, f, error)
      if found:
        raise _refusal(path, f"it pickles {', '.join(found)}, which a weights-only load "
                             f"does not build (unpickling it could run code)") from None
      raise _refusal(path, f"a weights-only load cannot read it ({_reason(error)}): it is "
                           f"not a torch.save file of tensors, or it uses pickle features "
                           f"that can run code") from None
    except RuntimeError as error:
      if "TorchScript" in str(error):
        raise _refusal(path, "it is a TorchScript archive, which torch.load reads only by "
                             "running it") from None
      raise UserError(f"cannot read {path!r} as a PyTorch checkpoint "
                      f"({first_line(error)})") from None
    except UserError:
      raise
    except Exception as error:  # truncated zip, EOF, bad magic: not a readable checkpoint
      raise UserError(f"cannot read {path!r} as a PyTorch checkpoint "
                      f"({first_line(error)})") from None


def _torch_version(torch: Any) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", str(torch.__version__))[:2])


def _readable_global(name: str) -> str:
  """A pickle global as Python 3 names it: protocol 2 writes `commands.call` for
  subprocess.call, and torch's message drops `builtins.`."""
  module, _, attr = name.rpartition(".")
  if not module:
    return f"builtins.{attr}"
  module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
  return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


def _refused_globals(torch: Any, f: IO[bytes], error: BaseException) -> list[str]:
  """Every global a weights-only load refuses in a zip checkpoint (a static scan: no
  unpickling); for a legacy (non-zip) file, or if the scan fails, the one torch names."""
  try:
    f.seek(0)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
  except Exception:  # legacy format, or opcodes the scanner does not know
    found = []
  found = found or re.findall(r"GLOBAL (\S+)", str(error))
  return sorted({_readable_global(name) for name in found})


def _reason(error: BaseException) -> str:
  """torch's specific complaint, without the paragraphs around it."""
  boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                 "In PyTorch 2.6", "(1)", "(2)")
  lines = [line.strip() for line in str(error).splitlines()]
  lines = [line for line in lines if line and not line.startswith(boilerplate)]
  return lines[0] if lines else "refused"


def safetensors_sibling(path: str) -> str | None:
  """A .safetensors file next to `path` with its stem (and HF's model.safetensors
  beside pytorch_model.bin), if there is one."""
  stem = next((path[:-len(suffix)] for suffix in TORCH_SUFFIXES if path.endswith(suffix)),
              None)
  candidates = [stem + SAFETENSORS_SUFFIX] if stem else []
  if io.name(path) == "pytorch_model.bin":
    candidates.append(io.join(io.parent(path), "model" + SAFETENSORS_SUFFIX))
  return next((c for c in candidates if io.is_file(c)), None)


def _refusal(path: str, what: str) -> UntrustedPickleError:
  sibling = safetensors_sibling(path)
  instead = (f"; {sibling!r} sits next to it and holds tensors only: convert that instead"
             if sibling else "")
  return UntrustedPickleError(
      f"refusing to unpickle {path!r}: {what}; if you trust the file, convert it with "
      f"--trust_pickle (Python: trust_pickle=True), which runs its code, on a machine "
      f"where that is safe, or save its state_dict with safetensors.torch.save_file there "
      f"and convert the {SAFETENSORS_SUFFIX} file{instead}")
