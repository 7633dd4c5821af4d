"""The converted-weights format training reads without torch, and mim_jax checkpoints.

A converted file is one `.npz`: every parameter under its '/'-joined mim_jax path
(`encoder/blocks_0/attn/qkv/kernel`, `decoder/pred/bias`, ...) plus `__arch__`, a
JSON description of the architecture (see `ARCH_DEFAULTS`). `load_converted`
also reads the params of a mim_jax training run straight from its workdir (or
one `checkpoints/<step>` directory), so a pre-trained mim_jax model can be a
teacher or be exported without an intermediate file.
"""

import dataclasses
import hashlib
import io as bytes_io
import json
import os
from typing import Any

import numpy as np

from mim_jax import io, workdir
from mim_jax.errors import UserError
from mim_jax.trainer.tree import flatten_with_names

ARCH_KEY = "__arch__"
# Tasks whose checkpoints hold a fine-tuned classifier (with `distill`: + a distillation
# head, {'encoder', 'distill'}; the encoder alone is the classifier of its `head`).
FINETUNE_TASKS = ("finetune", "finetune_distill")
ARCH_DEFAULTS: dict[str, Any] = {
    "backbone": "vit",  # models.registry name; files written before it existed are ViTs
    "patch_size": 16,
    "image_size": 224,
    "width": None,
    "depth": None,
    "num_heads": None,
    "mlp_ratio": 4.0,
    "posemb": "sincos",  # 'sincos': a constant, not stored; 'learn': encoder/pos_embed; 'none'

    "pool": "cls",  # 'cls' (final `norm`) or 'gap' (`fc_norm`, no `norm`)
    "num_classes": 0,
    "qkv_bias": "qkv",  # 'qkv' | 'qv' (q_bias, v_bias) | 'none'
    "rel_pos_bias": "none",  # 'none' | 'shared' | 'per_block' relative position bias
    "layer_scale": None,  # per-channel residual scales (gamma_1, gamma_2) when set
    "extra_attention_block": False,  # D²-MAE's attention-only block `blocks_{depth}`
    "decoder": None,  # None or {'width', 'depth', 'num_heads'}
    "source": "",
}


@dataclasses.dataclass(frozen=True)
class Converted:
  """Params ({'encoder', optional 'decoder', optional 'distill'}), architecture, hash."""
  params: dict[str, Any]
  arch: dict[str, Any]
  sha256: str
  path: str

  def build_encoder(self, **role: Any) -> Any:
    """The encoder module these weights belong to (its backbone's, `models.registry`)."""
    return build_encoder(self.arch, **role)


def build_encoder(arch: dict[str, Any], **role: Any) -> Any:
  """The module an architecture description names (role: dtype, scan_blocks, ...)."""
  from mim_jax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.get(arch.get("backbone", "vit")).build_from_arch(arch, **role)


def check_arch(arch: dict[str, Any]) -> dict[str, Any]:
  """Fills defaults and rejects incomplete or unknown architecture descriptions."""
  unknown = sorted(set(arch) - set(ARCH_DEFAULTS))
  if unknown:
    raise UserError(f"unknown architecture keys {unknown}; known: {sorted(ARCH_DEFAULTS)}")
  full = {**ARCH_DEFAULTS, **arch}
  missing = [k for k in ("width", "depth", "num_heads") if not full[k]]
  if missing:
    raise UserError(f"architecture description lacks {missing}")
  if full["posemb"] not in ("sincos", "learn", "none") or full["pool"] not in ("cls", "gap"):
    raise UserError(f"architecture has posemb={full['posemb']!r} (sincos|learn|none) and "
                    f"pool={full['pool']!r} (cls|gap)")
  if full["decoder"] is not None:
    decoder_missing = {"width", "depth", "num_heads"} - set(full["decoder"])
    if decoder_missing:
      raise UserError(f"decoder description lacks {sorted(decoder_missing)}")
  return full


def content_hash(params: Any) -> str:
  """sha256 over every leaf's name, dtype, shape and bytes (independent of file format)."""
  digest = hashlib.sha256()
  for name, leaf in sorted(flatten_with_names(params).items()):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def describe_nonfinite(leaves: dict[str, Any], limit: int = 3) -> str:
  """'' if every value of every leaf is finite; else one line naming up to `limit`
  leaves with NaN / Inf and how many of their values are."""
  bad = []
  for name, leaf in leaves.items():
    array = np.asarray(leaf)
    if array.dtype.kind in "biuSUO":  # integers, bools, strings: always finite
      continue
    if array.dtype.kind == "V":  # ml_dtypes (bfloat16, float8): isfinite via float32
      array = array.astype(np.float32)
    count = int(array.size - np.count_nonzero(np.isfinite(array)))
    if count:
      bad.append(f"{name} ({count:,} of {array.size:,} values)")
  if not bad:
    return ""
  more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
  return (f"{len(bad)} of {len(leaves)} tensors hold NaN or Inf: "
          f"{', '.join(bad[:limit])}{more}")


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save_converted(path: str, params: dict[str, Any], arch: dict[str, Any]) -> str:
  """Writes `params` and `arch` to `path` (.npz); returns the content hash."""
  if not str(path).endswith(".npz"):
    raise UserError(f"converted weights are written as .npz; got {path!r}")
  if "encoder" not in params:
    raise UserError(f"params have no 'encoder' entry (top level: {sorted(params)})")
  arch = check_arch(arch)
  flat = {name: np.asarray(leaf) for name, leaf in flatten_with_names(params).items()}
  buffer = bytes_io.BytesIO()
  np.savez(buffer, **flat, **{ARCH_KEY: np.asarray(json.dumps(arch))})
  io.write_bytes(path, buffer.getvalue())  # all or nothing, local or gs://
  return content_hash(params)


def load_converted(path: str) -> Converted:
  """Reads a converted `.npz`, a mim_jax workdir (latest step) or a checkpoint step dir."""
  path = os.fspath(path)
  if not io.exists(path):
    raise UserError(f"no such file or directory: {path!r} (expected a converted .npz from "
                    f"`python -m mim_jax.convert from_torch` or a mim_jax workdir)")
  if io.is_dir(path):
    params, arch = _read_training_checkpoint(path)
  else:
    params, arch = _read_npz(path)
  return Converted(params=params, arch=arch, sha256=content_hash(params), path=path)


def _read_npz(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  content = io.read_bytes(path)
  try:
    with np.load(bytes_io.BytesIO(content), allow_pickle=False) as data:
      flat = {name: data[name] for name in data.files}
  except Exception as error:  # zipfile/pickle/format errors all mean "not ours"
    raise UserError(f"{path!r} is not a converted .npz ({type(error).__name__}: {error}); "
                    f"PyTorch checkpoints are converted first with `python -m mim_jax.convert "
                    f"from_torch {path} OUT.npz`") from None
  if ARCH_KEY not in flat:
    names = sorted(flat)[:5]
    raise UserError(f"{path!r} has no {ARCH_KEY} entry, so it was not written by mim_jax's "
                    f"converter (found {len(flat)} arrays, e.g. {names})")
  arch = check_arch(json.loads(str(flat.pop(ARCH_KEY))))
  return unflatten(flat), arch


# ----------------------------------------------------------------------------
# mim_jax training checkpoints
# ----------------------------------------------------------------------------
def arch_from_config(config: dict[str, Any], source: str = "") -> dict[str, Any]:
  """The architecture of a pre-training or fine-tuning config (as stored in checkpoint
  metadata, any version): fine-tuned models have a learned position embedding, their
  pooling and a head."""
  from mim_jax import config_upgrade  # pylint: disable=g-import-not-at-top
  from mim_jax.models import registry  # pylint: disable=g-import-not-at-top
  config = config_upgrade.upgrade(config)
  model = config["model"]
  finetuned = config.get("task") in FINETUNE_TASKS
  decoder = (config.get("mae") or {}).get("decoder")
  arch = registry.get_backbone(model).arch(
      model, config["image_size"], posemb="learn" if finetuned else "sincos",
      pool=model.get("pool", "cls"),
      num_classes=config.get("num_classes", 0) if finetuned else 0,
      extra_attention_block=bool((config.get("distill") or {}).get("extra_attention_block")))
  arch["decoder"] = ({k: decoder[k] for k in ("width", "depth", "num_heads")}
                     if decoder else None)
  arch["source"] = source
  return check_arch(arch)


def _read_training_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, arch) of the newest readable checkpoint of a run (or of one step dir)."""

  def read(step_dir: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return (workdir.read_meta(step_dir), workdir.read_config(step_dir),
            workdir.read_params(step_dir))

  step_dir, (meta, config, params) = workdir.latest_readable(path, read)
  if config.get("task") == "linear_probe":
    raise UserError(f"{step_dir!r} is a linear-probe run: its checkpoints hold the probe head "
                    f"and BatchNorm statistics only; its frozen encoder is "
                    f"{config.get('init') or 'a random init'!r}")
  if config.get("task") == "finetune":  # a fine-tuned classifier's params are the encoder's
    params = {"encoder": params}
  if config.get("task") == "finetune_distill" and config["model"].get("pool") == "cls":
    raise UserError(f"{step_dir!r} was fine-tuned with DeiT's distillation token (pool='cls'), "
                    f"which its encoder needs and converted weights cannot describe; evaluate "
                    f"it with its own config")
  if "encoder" not in params:
    raise UserError(f"the checkpoint in {step_dir!r} has no encoder params "
                    f"(top level: {sorted(params)})")
  if meta.get("arch"):  # what the task trained; older checkpoints: derived from the config
    return params, check_arch({**meta["arch"], "source": step_dir})
  return params, arch_from_config(config, source=step_dir)
