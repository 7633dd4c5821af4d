"""PyTorch checkpoint files, and the converter's Python API (both directions).

torch is imported inside the functions that need it, so importing this module
(and `mim_jax.convert`) works without the `torch` extra. Paths may be local or
`gs://` (`mim_jax.io`). `.safetensors` (tensors only) is the format to prefer
both ways; pickled `.pth` files are read weights-only (`torch_pickle`), and one
holding anything that could run code is refused unless `trust_pickle=True`.

  convert_from_torch('mae_pretrain_vit_base.pth', 'mae_base.npz')
  export_to_torch('/tmp/workdir', 'vit_tiny.safetensors')
"""

import dataclasses
import os
from io import BytesIO
from typing import Any

import numpy as np
from absl import logging

from mim_jax import io
from mim_jax.convert import converted, torch_format, torch_pickle, vit_rpe_torch
from mim_jax.convert.torch_pickle import (  # noqa: F401  (UntrustedPickleError: API)
    SAFETENSORS_SUFFIX, TORCH_SUFFIXES, UntrustedPickleError)
from mim_jax.errors import UserError

# Where training scripts keep the weights inside a checkpoint dict, in order of preference.
WEIGHT_ENTRIES = ("model", "state_dict", "module", "model_state", "model_ema",
                  "state_dict_ema")


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def _load_safetensors(path: str) -> dict[str, Any]:
  torch_pickle.import_torch()
  try:
    from safetensors.torch import load  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("reading .safetensors needs safetensors: pip install -e '.[torch]'") from None
  data = io.read_bytes(path)
  try:
    return load(data)
  except Exception as error:
    raise UserError(f"cannot read {path!r} as safetensors "
                    f"({torch_pickle.first_line(error)})") from None


def _is_tensor(value: Any) -> bool:
  torch = torch_pickle.import_torch()
  return isinstance(value, (torch.Tensor, np.ndarray))


def _tensor_dict(value: Any) -> bool:
  return isinstance(value, dict) and bool(value) and all(_is_tensor(v) for v in value.values())


def _select_weights(obj: Any, path: str) -> tuple[dict[str, Any], str]:
  """The state_dict inside a loaded checkpoint and a note on where it was found."""
  if isinstance(obj, torch_pickle.import_torch().nn.Module):  # only from --trust_pickle
    return obj.state_dict(), "the pickled module's state_dict()"
  if not isinstance(obj, dict):
    raise UserError(f"{path!r} holds a {type(obj).__name__}, not a state_dict (a dict of "
                    f"tensors) or a checkpoint dict with one under 'model' or 'state_dict'")
  if _tensor_dict(obj):
    return obj, "the top level"
  for name in WEIGHT_ENTRIES:
    if _tensor_dict(obj.get(name)):
      others = [k for k in obj if k != name]
      also = f" (also in the file: {torch_format.listing(map(str, others), 6)})" if others else ""
      return obj[name], f"checkpoint[{name!r}]{also}"
  entries = [f"{k} ({type(v).__name__})" for k, v in obj.items()]
  raise UserError(f"{path!r} has no state_dict: top-level keys {torch_format.listing(entries)}; "
                  f"expected a dict of tensors, or one under "
                  f"{' / '.join(repr(n) for n in WEIGHT_ENTRIES[:2])}")


def _to_numpy(tensor: Any) -> np.ndarray:
  if isinstance(tensor, np.ndarray):
    return tensor
  torch = torch_pickle.import_torch()
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
    tensor = tensor.float()
  return tensor.numpy()


def _check_path(path: str) -> str:
  path = os.fspath(path)
  if not io.is_file(path):
    what = "a directory" if io.is_dir(path) else "no such file"
    raise UserError(f"{path!r}: {what}; expected a PyTorch checkpoint file "
                    f"({SAFETENSORS_SUFFIX} or {', '.join(TORCH_SUFFIXES)})")
  return path


def read_torch_checkpoint_with_source(path: str, *, trust_pickle: bool = False
                                      ) -> tuple[dict[str, np.ndarray], str]:
  """`read_torch_checkpoint` plus where in the file the weights were found."""
  path = _check_path(path)
  if path.endswith(SAFETENSORS_SUFFIX):
    state_dict, where = _load_safetensors(path), "the safetensors file"
  else:
    state_dict, where = _select_weights(torch_pickle.load(path, trust_pickle=trust_pickle), path)
    if trust_pickle:
      where += " (full unpickling: trust_pickle)"
  logging.info("read %d tensors from %s of %s", len(state_dict), where, path)
  return {str(k): _to_numpy(v) for k, v in state_dict.items()}, where


def read_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The state_dict in a .safetensors / .pth / .pth.tar / .bin file, as numpy arrays.

  A checkpoint dict holding the weights under 'model' (MAE, MAE-Lite), 'state_dict'
  or a similar entry is unwrapped (preferring 'model', then 'state_dict'); the entry
  used is logged. Pickles are read weights-only (tensors, containers, numbers and
  `torch_pickle.SAFE_GLOBALS`); one holding anything else raises
  `UntrustedPickleError` naming it, unless `trust_pickle=True`, which unpickles
  fully and so runs any code the file holds: only for files you trust.
  """
  return read_torch_checkpoint_with_source(path, trust_pickle=trust_pickle)[0]


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def _check_output_suffix(path: str) -> str:
  path = os.fspath(path)
  if not path.endswith((".pth", ".pt", SAFETENSORS_SUFFIX)):
    raise UserError(f"write the PyTorch weights as {SAFETENSORS_SUFFIX} (tensors only, "
                    f"recommended), .pth or .pt; got {path!r}")
  return path


def _write(path: str, state_dict: dict[str, np.ndarray]) -> None:
  torch = torch_pickle.import_torch()
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors.torch import save  # pylint: disable=g-import-not-at-top
    data = save(tensors, metadata={"format": "pt"})
  else:
    buffer = BytesIO()
    torch.save(tensors, buffer)
    data = buffer.getvalue()
  io.write_bytes(path, data)


def write_torch_state_dict(path: str, state_dict: dict[str, np.ndarray]) -> None:
  """Writes a flat state_dict as .safetensors or .pth/.pt (torch.save), all or nothing.

  Refuses (writing nothing) a state_dict with NaN or Inf values.
  """
  path = _check_output_suffix(path)
  bad = converted.describe_nonfinite(state_dict)
  if bad:
    raise UserError(f"refusing to write {path!r}: {bad}; nothing was written")
  _write(path, state_dict)


# ----------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Summary:
  """What a conversion did, for people (`str(summary)`) and programs."""
  direction: str  # 'from_torch' or 'to_torch'
  in_path: str
  out_path: str
  arch: dict[str, Any]
  num_params: int  # number of scalars written
  dropped: list[str]
  sha256: str = ""  # of the converted params (from_torch)
  weights_entry: str = ""  # where in the torch file the weights were (from_torch)
  timm_call: str = ""
  notes: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f"{self.direction}: {self.in_path} -> {self.out_path}",
             f"  architecture: {torch_format.describe_arch(self.arch)}",
             f"  scalars written: {self.num_params:,}"]
    if self.weights_entry:
      lines.append(f"  weights read from: {self.weights_entry}")
    lines += [f"  assumed: {line}" for line in self.notes]
    lines += [f"  dropped: {line}" for line in self.dropped] or ["  dropped: nothing"]
    if self.sha256:
      lines.append(f"  sha256 of the params: {self.sha256}")
    if self.timm_call:
      lines.append(f"  load it: {self.timm_call}")
    return "\n".join(lines)


def _count(tree: Any) -> int:
  if isinstance(tree, dict):
    return sum(_count(v) for v in tree.values())
  return int(np.size(tree))


def convert_from_torch(in_path: str, out_path: str, *, num_heads: int | None = None,
                       decoder_num_heads: int | None = None,
                       trust_pickle: bool = False) -> Summary:
  """A timm / MAE / MAE-Lite checkpoint -> a converted .npz (`converted.load_converted`).

  `trust_pickle`: see `read_torch_checkpoint` (True runs any code a pickle holds).
  """
  if not os.fspath(out_path).endswith(".npz"):
    raise UserError(f"converted weights are written as .npz; got {os.fspath(out_path)!r}")
  state_dict, where = read_torch_checkpoint_with_source(in_path, trust_pickle=trust_pickle)
  if vit_rpe_torch.is_rpe_state_dict(state_dict):  # BEiT-style: MAE-Lite's RPE model, Beit
    params, arch, dropped = vit_rpe_torch.import_state_dict(state_dict, num_heads=num_heads,
                                                            source=os.fspath(in_path))
    result = torch_format.ImportResult(params=params, arch=arch, dropped=dropped)
  else:
    try:
      result = torch_format.import_state_dict(state_dict, num_heads=num_heads,
                                              decoder_num_heads=decoder_num_heads,
                                              source=os.fspath(in_path))
    except torch_format.NotAViTError as error:
      raise torch_format.NotAViTError(f"{error} (weights taken from {where})") from None
  sha256 = converted.save_converted(out_path, result.params, result.arch)
  return Summary(direction="from_torch", in_path=os.fspath(in_path), out_path=os.fspath(out_path),
                 arch=result.arch, num_params=_count(result.params), dropped=result.dropped,
                 sha256=sha256, weights_entry=where, notes=result.notes)


def _export_dropped(params: dict[str, Any], arch: dict[str, Any],
                    include_decoder: bool) -> list[str]:
  dropped = []
  depth = arch["depth"]
  if arch["extra_attention_block"] and f"blocks_{depth}" in params["encoder"]:
    dropped.append(f"D²-MAE attention-only block {depth + 1} (encoder/blocks_{depth}): "
                   f"not part of the encoder")
  if "distill" in params:
    dropped.append(f"'distill' ({_count(params['distill']):,} scalars: distillation mappings, "
                   f"or a distillation head whose logits `head` alone replaces): not part of "
                   f"the encoder")
  if "decoder" in params and not include_decoder:
    dropped.append("MAE decoder (export it with --include_decoder)")
  return dropped


def _load_hint(out_path: str, timm_call: str, include_decoder: bool) -> str:
  safetensors = out_path.endswith(SAFETENSORS_SUFFIX)
  if safetensors:
    read = f"safetensors.torch.load_file({out_path!r})"
  else:
    read = f"torch.load({out_path!r}, weights_only=True)"
  if include_decoder:
    hint = (f"{read} holds MAE's full model (encoder + decoder_* keys, as "
            f"models_mae.MaskedAutoencoderViT); the encoder alone loads into {timm_call}")
  else:
    hint = f"model = {timm_call}; model.load_state_dict({read}, strict=True)"
  tip = f" (a {SAFETENSORS_SUFFIX} OUT holds tensors only: no pickle to trust)"
  return hint if safetensors else hint + tip


def export_to_torch(in_path: str, out_path: str, include_decoder: bool = False) -> Summary:
  """A converted .npz or a mim_jax workdir / checkpoint dir -> a timm state_dict file
  (.safetensors recommended, or .pth). Params with NaN or Inf are refused, nothing written.
  """
  _check_output_suffix(out_path)
  source = converted.load_converted(in_path)
  arch = source.arch
  if vit_rpe_torch.handles(arch):  # relative position bias, q/v biases, layer scale
    if include_decoder:
      raise UserError("--include_decoder exports MAE decoders of plain ViTs only")
    state_dict, _ = vit_rpe_torch.state_dict_from_params(source.params, arch)
  else:
    state_dict = torch_format.state_dict_from_params(source.params, arch,
                                                     include_decoder=include_decoder)
  bad = converted.describe_nonfinite(state_dict)
  if bad:
    raise UserError(f"refusing to export {os.fspath(in_path)!r}: {bad}; nothing was written "
                    f"(export a checkpoint from before the values went non-finite)")
  _write(os.fspath(out_path), state_dict)
  if vit_rpe_torch.handles(arch):
    timm_call = vit_rpe_torch.create_call(arch)
  else:
    timm_call = torch_format.timm_create_call(arch,
                                              fc_norm=torch_format.has_fc_norm(source.params))
  return Summary(direction="to_torch", in_path=os.fspath(in_path), out_path=os.fspath(out_path),
                 arch=arch, num_params=_count(state_dict),
                 dropped=_export_dropped(source.params, arch, include_decoder),
                 sha256=source.sha256,
                 timm_call=_load_hint(os.fspath(out_path), timm_call, include_decoder))
