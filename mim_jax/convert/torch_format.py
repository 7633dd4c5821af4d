"""PyTorch state_dicts (timm / MAE / MAE-Lite) <-> mim_jax params, in pure numpy.

No torch here (`torch_io` reads and writes the files). One table of entries,
built from the architecture, drives both directions: each entry names a torch
key, its torch shape, the mim_jax param path and the layout change (Dense
kernel = weight.T, Conv kernel (p, p, 3, d) = weight (d, 3, p, p) transposed).
Import infers the architecture from the keys and shapes, builds the table and
then insists that the state_dict matches it exactly: any missing key, unexpected
key or shape mismatch is a `UserError` that lists them.

What import accepts:
* timm `VisionTransformer` (cls token; `pos_embed` with the cls slot, or without it
  as timm's `no_embed_class=True`, imported as a zero cls slot, which is the same
  function; `norm`, or `fc_norm` and no `norm` (global pooling); optional `head`);
* the official MAE release (`mae_pretrain_vit_*.pth`, `*_full.pth` with the
  decoder: `decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.i,
  decoder_norm, decoder_pred`; fine-tuned `mae_finetuned_vit_*.pth`);
* MAE-Lite training checkpoints (github.com/wangsr126/MAE-Lite): the model sits
  under `model.` (after `module.` from DDP) beside the distillation wrapper's
  `tch_model.` (teacher), `attn_adapter.adapter{i}.weight` (head mapping, a 1x1
  conv (h_t, h_s, 1, 1)), `hidden_adapter.adapter{i}.weight` and `ema_model.`; those
  siblings are dropped with a log line (the mappings are meaningless without
  the run's teacher and layer choice). D²-MAE students (`mae_vit_tiny_d13_patch16`)
  have a 13th block with only `norm1` and `attn.qkv`: it is imported as
  `encoder/blocks_{depth}` with `extra_attention_block=True`. A fine-tuned
  DeiT-style distilled head (`dist_norm`, `head_dist`) is dropped too (MAE-Lite's
  inference averages it with `head`; the imported logits are those of `head`).
  Every dropped group is logged and listed in the converter's summary.

Position embeddings: a `pos_embed` equal to the 2-D sin-cos table (within 1e-5)
becomes posemb='sincos' and is not stored (mim_jax computes it); anything else is
posemb='learn', stored as `encoder/pos_embed`. The MAE decoder's
`decoder_pos_embed` must be the sin-cos table (mim_jax's decoder uses it as a
constant). Weights are imported as float32.
"""

import math
import re
from typing import Any

import numpy as np
from absl import logging

from mim_jax.convert.vit_schema import (  # pylint: disable=unused-import
    DECODER_HEADS_BY_WIDTH, DROPPED_MODEL_PARTS, HEADS_BY_WIDTH, SINCOS_ATOL, TIMM_NAMES,
    WRAPPER_SIBLINGS, Entry, ImportResult, _get, _hidden, _is_sincos, _leaf_paths, _put,
    _to_jax, _to_torch, _where, decoder_entries, encoder_entries, grid_size, listing,
    sincos_table, timm_create_call, timm_model_kwargs, timm_model_name)

# Architecture options whose value other than this one timm's VisionTransformer lacks.
TIMM_VIT_OPTIONS = {"qkv_bias": "qkv", "rel_pos_bias": "none", "layer_scale": None}
from mim_jax.errors import UserError
from mim_jax.trainer.tree import shape_problems

# ----------------------------------------------------------------------------
# Import: state_dict -> params
# ----------------------------------------------------------------------------
def strip_wrappers(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Removes `module.` / `model.` prefixes (nested) and MAE-Lite's wrapper siblings.

  Returns the model's own state_dict and one line per dropped group.
  """
  dropped: list[str] = []
  while state_dict:
    keys = list(state_dict)
    if all(k.startswith("module.") for k in keys):
      state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
      continue
    if not any(k.startswith("model.") for k in keys):
      break
    others = [k for k in keys if not k.startswith("model.")]
    if any(not k.startswith(tuple(WRAPPER_SIBLINGS)) for k in others):
      break  # `model.` is not a wrapper here: leave the keys for the strict check
    for prefix, what in WRAPPER_SIBLINGS.items():
      group = [k for k in others if k.startswith(prefix)]
      if group:
        dropped.append(f"{what}: {len(group)} tensor(s) ({listing(group, 4)})")
    state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
  return state_dict, dropped


def _drop_model_parts(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  dropped = []
  for prefix, what in DROPPED_MODEL_PARTS.items():
    group = [k for k in state_dict if k.startswith(prefix)]
    if group:
      dropped.append(f"{what}: {listing(group, 4)}")
  kept = {k: v for k, v in state_dict.items() if not k.startswith(tuple(DROPPED_MODEL_PARTS))}
  return kept, dropped


def _block_indices(state_dict: dict[str, Any], prefix: str) -> dict[int, set[str]]:
  """{i: {sub-keys}} for keys '{prefix}.{i}.{sub}'."""
  pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
  blocks: dict[int, set[str]] = {}
  for key in state_dict:
    match = pattern.match(key)
    if match:
      blocks.setdefault(int(match.group(1)), set()).add(match.group(2))
  return blocks


class NotAViTError(UserError):
  """The tensors are not recognisably a ViT at all (the message lists what was found)."""


def _not_a_vit(state_dict: dict[str, Any], source: str) -> UserError:
  names = [f"{k} {tuple(np.shape(v))}" for k, v in list(state_dict.items())[:6]]
  more = " ..." if len(state_dict) > 6 else ""
  found = f"{len(state_dict)} tensors: {', '.join(names)}{more}" if state_dict else "no tensors"
  return NotAViTError(
      f"{_where(source)}not a ViT state_dict: found {found}; "
      f"expected timm/MAE/MAE-Lite ViT keys (patch_embed.proj.weight, cls_token, pos_embed, "
      f"blocks.0.attn.qkv.weight, ...), possibly under model./module.")


def _shape(state_dict: dict[str, Any], key: str) -> tuple[int, ...] | None:
  return tuple(np.shape(state_dict[key])) if key in state_dict else None


def _pick_heads(width: int, given: int | None, table: dict[int, int], flag: str,
                what: str, source: str) -> int:
  heads = given or table.get(width)
  if heads is None:
    raise UserError(f"{_where(source)}the number of {what} attention heads is not stored in "
                    f"the weights and width {width} has no default "
                    f"({', '.join(f'{w}->{h}' for w, h in sorted(table.items()))}): "
                    f"pass {flag}")
  if width % heads:
    raise UserError(f"{_where(source)}{what} width {width} is not divisible by {flag}={heads}")
  return heads


def _infer_decoder(state_dict: dict[str, Any], decoder_num_heads: int | None,
                   source: str) -> dict[str, Any] | None:
  keys = [k for k in state_dict if k.startswith("decoder_") or k == "mask_token"]
  if not keys:
    return None
  shape = _shape(state_dict, "decoder_embed.weight") or _shape(state_dict, "mask_token")
  if not shape:
    raise UserError(f"{_where(source)}decoder keys ({listing(keys, 5)}) without "
                    f"decoder_embed.weight or mask_token: cannot tell the decoder width")
  width = shape[0] if len(shape) == 2 else shape[-1]
  blocks = _block_indices(state_dict, "decoder_blocks")
  depth = max(blocks) + 1 if blocks else 0
  heads = _pick_heads(width, decoder_num_heads, DECODER_HEADS_BY_WIDTH, "--decoder_num_heads",
                      "decoder", source)
  return {"width": width, "depth": depth, "num_heads": heads}


def infer_arch(state_dict: dict[str, Any], *, num_heads: int | None = None,
               decoder_num_heads: int | None = None, source: str = "") -> dict[str, Any]:
  """The architecture a (stripped) state_dict describes; the strict check comes after."""
  proj = _shape(state_dict, "patch_embed.proj.weight")
  blocks = _block_indices(state_dict, "blocks")
  if proj is None or not blocks:
    raise _not_a_vit(state_dict, source)
  if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
    raise UserError(f"{_where(source)}patch_embed.proj.weight has shape {proj}; expected "
                    f"(width, 3, p, p) (RGB input, square patches)")
  width, patch = proj[0], proj[2]
  num_blocks = max(blocks) + 1
  last = blocks.get(num_blocks - 1, set())
  extra = (num_blocks > 1 and "attn.qkv.weight" in last and
           not any(s.startswith(("attn.proj.", "norm2.", "mlp.")) for s in last))
  depth = num_blocks - int(extra)
  fc1 = _shape(state_dict, "blocks.0.mlp.fc1.weight") or (int(4 * width), width)  # else: missing
  pos = _shape(state_dict, "pos_embed")
  if pos is None:
    raise UserError(f"{_where(source)}missing key pos_embed (mim_jax's ViT adds position "
                    f"embeddings)")
  grid = _grid_of(pos, width, source)
  if len(fc1) != 2 or _hidden(width, fc1[0] / width) != fc1[0]:
    raise UserError(f"{_where(source)}blocks.0.mlp.fc1.weight has shape {fc1}; expected "
                    f"(hidden, {width}) with hidden = int({width} * mlp_ratio)")
  head = _shape(state_dict, "head.weight")
  pool = "gap" if "fc_norm.weight" in state_dict and "norm.weight" not in state_dict else "cls"
  arch = {
      "patch_size": patch, "image_size": grid * patch, "width": width, "depth": depth,
      "num_heads": _pick_heads(width, num_heads, HEADS_BY_WIDTH, "--num_heads", "encoder",
                               source),
      "mlp_ratio": fc1[0] / width, "posemb": "learn", "pool": pool,
      "num_classes": head[0] if head else 0, "extra_attention_block": extra,
      "decoder": _infer_decoder(state_dict, decoder_num_heads, source),
      "source": source,
  }
  if _is_sincos(_full_pos_embed(np.asarray(state_dict["pos_embed"], np.float32), grid), grid):
    arch["posemb"] = "sincos"
  return arch


def _grid_of(pos: tuple[int, ...], width: int, source: str) -> int:
  """Grid side from a pos_embed shape (1, 1 + L, d) or, without the cls slot, (1, L, d)."""
  if len(pos) == 3 and pos[0] == 1 and pos[2] == width:
    for tokens in (pos[1] - 1, pos[1]):
      side = math.isqrt(max(tokens, 0))
      if tokens > 0 and side * side == tokens:
        return side
  raise UserError(f"{_where(source)}pos_embed has shape {pos}; expected (1, 1 + n*n, {width}) "
                  f"(or (1, n*n, {width}) without the cls slot) for a square patch grid")


def _full_pos_embed(table: np.ndarray, grid: int) -> np.ndarray:
  """Adds the zero cls slot to a timm `no_embed_class` table (same function)."""
  if table.shape[1] == grid * grid:
    return np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
  return table


def _report(problems: dict[str, list[str]], kind_names: dict[str, str]) -> str:
  return "; ".join(f"{kind_names[kind]}: {listing(names)}" for kind, names in problems.items())


def _check_strict(state_dict: dict[str, Any], expected: dict[str, tuple[int, ...]],
                  arch: dict[str, Any], source: str) -> None:
  found = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  problems = shape_problems(found, expected)
  if problems:
    report = _report(problems, {"missing": "missing keys", "unexpected": "unexpected keys",
                                "mismatched": "shape mismatches (got != expected)"})
    raise UserError(f"{_where(source)}the state_dict does not match the ViT its shapes "
                    f"describe ({describe_arch(arch)}): {report}")


def describe_arch(arch: dict[str, Any]) -> str:
  """One line: 'width 192, depth 12, 12 heads, patch 16, 224 px, ...'."""
  text = (f"width {arch['width']}, depth {arch['depth']}, {arch['num_heads']} heads, "
          f"patch {arch['patch_size']}, {arch['image_size']} px, mlp x{arch['mlp_ratio']:g}, "
          f"posemb {arch['posemb']}, pool {arch['pool']}, {arch['num_classes']} classes")
  if arch.get("extra_attention_block"):
    text += f", D²-MAE attention-only block {arch['depth'] + 1}"
  decoder = arch.get("decoder")
  if decoder:
    text += (f", decoder width {decoder['width']} depth {decoder['depth']} "
             f"{decoder['num_heads']} heads")
  return text


def import_state_dict(state_dict: dict[str, Any], *, num_heads: int | None = None,
                      decoder_num_heads: int | None = None, source: str = "") -> ImportResult:
  """`params_from_state_dict` that also returns what was dropped."""
  state_dict, dropped = strip_wrappers(dict(state_dict))
  state_dict, dropped_parts = _drop_model_parts(state_dict)
  dropped += dropped_parts
  arch = infer_arch(state_dict, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                    source=source)
  grid = grid_size(arch)
  entries = encoder_entries(arch) + (decoder_entries(arch) if arch["decoder"] else [])
  expected = {e.key: e.shape for e in entries}
  expected["pos_embed"] = (1, (1 if _shape(state_dict, "pos_embed")[1] != grid * grid else 0)
                           + grid * grid, arch["width"])
  if arch["decoder"]:
    expected["decoder_pos_embed"] = (1, 1 + grid * grid, arch["decoder"]["width"])
  _check_strict(state_dict, expected, arch, source)

  params: dict[str, Any] = {}
  for entry in entries:
    value = np.asarray(state_dict[entry.key], dtype=np.float32)
    _put(params, entry.path, np.ascontiguousarray(_to_jax(entry.kind)(value)))
  if arch["posemb"] == "learn":
    table = _full_pos_embed(np.asarray(state_dict["pos_embed"], np.float32), grid)
    _put(params, ("encoder", "pos_embed"), np.ascontiguousarray(table))
  if arch["decoder"]:
    table = np.asarray(state_dict["decoder_pos_embed"], np.float32)
    if not _is_sincos(table, grid):
      raise UserError(f"{_where(source)}decoder_pos_embed is not the fixed 2-D sin-cos table "
                      f"(within {SINCOS_ATOL}) that mim_jax's MAE decoder uses as a constant")
  return ImportResult(params=params, arch=arch, dropped=dropped,
                      notes=_default_notes(arch, num_heads, decoder_num_heads))


def _default_notes(arch: dict[str, Any], num_heads: int | None,
                   decoder_num_heads: int | None) -> list[str]:
  """Heads are not in the weights: say when a default was taken."""
  notes = []
  if num_heads is None:
    notes.append(f"encoder heads {arch['num_heads']}: the default for width {arch['width']} "
                 f"(not stored in the weights; pass --num_heads if the model used another)")
  if arch["decoder"] and decoder_num_heads is None:
    notes.append(f"decoder heads {arch['decoder']['num_heads']}: the default for width "
                 f"{arch['decoder']['width']} (pass --decoder_num_heads if it used another)")
  return notes


def params_from_state_dict(state_dict: dict[str, np.ndarray], *, num_heads: int | None = None,
                           decoder_num_heads: int | None = None,
                           source: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
  """A timm / MAE / MAE-Lite ViT state_dict -> (mim_jax params, arch).

  Args:
    state_dict: torch key -> array (numpy, or anything `np.asarray` takes).
    num_heads / decoder_num_heads: needed when the width has no default
      (`HEADS_BY_WIDTH`, `DECODER_HEADS_BY_WIDTH`).
    source: where the weights came from; recorded in arch['source'] and in errors.

  Raises:
    UserError: not a ViT, or any missing / unexpected key or shape mismatch.
  """
  result = import_state_dict(state_dict, num_heads=num_heads,
                             decoder_num_heads=decoder_num_heads, source=source)
  for line in result.dropped:
    logging.info("not imported: %s", line)
  for line in result.notes:
    logging.info("assumed: %s", line)
  return result.params, result.arch


# ----------------------------------------------------------------------------
# Export: params -> timm state_dict
# ----------------------------------------------------------------------------
def has_fc_norm(params: dict[str, Any]) -> bool:
  return _get(params, ("encoder", "fc_norm")) is not None


def _check_params(params: dict[str, Any], entries: list[Entry], arch: dict[str, Any],
                  include_decoder: bool) -> None:
  """Every expected leaf present with its shape; nothing unknown in encoder (or decoder)."""
  expected = {e.path: e.jax_shape for e in entries}
  if arch["posemb"] == "learn":
    grid = grid_size(arch)
    expected[("encoder", "pos_embed")] = (1, 1 + grid * grid, arch["width"])
  extra = f"blocks_{arch['depth']}" if arch["extra_attention_block"] else None
  parts = ("encoder", "decoder") if include_decoder else ("encoder",)
  found = {"/".join(p): tuple(np.shape(_get(params, p)))
           for part in parts for p in _leaf_paths(params.get(part, {}), (part,))}
  problems = shape_problems(
      found, {"/".join(p): shape for p, shape in expected.items()},
      ignore=lambda name: extra is not None and name.startswith(f"encoder/{extra}/"))
  if problems:
    report = _report(problems, {"missing": "missing params",
                                "unexpected": "params the architecture does not have",
                                "mismatched": "shape mismatches (got != expected)"})
    raise UserError(f"the params do not match their architecture ({describe_arch(arch)}): "
                    f"{report}")


def state_dict_from_params(params: dict[str, Any], arch: dict[str, Any], *,
                           include_decoder: bool = False) -> dict[str, np.ndarray]:
  """mim_jax params -> a timm `VisionTransformer` state_dict (float32 numpy arrays).

  Drops D²-MAE's extra attention-only block and `distill`; `pos_embed` always has
  the cls slot (the sin-cos table when posemb='sincos'). With `include_decoder`
  the MAE decoder is added under MAE's names (for MAE's own code, not timm).
  """
  unsupported = {k: arch.get(k) for k, plain in TIMM_VIT_OPTIONS.items()
                 if arch.get(k, plain) != plain}
  if arch.get("posemb") == "none":
    unsupported["posemb"] = "none"
  if unsupported:
    raise UserError(f"this ViT has {unsupported}, which timm's VisionTransformer state_dict "
                    f"cannot hold; export it with its own exporter")
  if include_decoder and (arch.get("decoder") is None or "decoder" not in params):
    raise UserError("this checkpoint has no decoder weights; export without --include_decoder")
  arch = {**arch, "decoder": arch.get("decoder") if include_decoder else None}
  entries = encoder_entries(arch, fc_norm=has_fc_norm(params), extra_block=False)
  if include_decoder:
    entries += decoder_entries(arch)
  _check_params(params, entries, arch, include_decoder)
  grid = grid_size(arch)
  state_dict = {}
  for entry in entries:
    value = np.asarray(_get(params, entry.path), dtype=np.float32)
    state_dict[entry.key] = np.ascontiguousarray(_to_torch(entry.kind)(value))
  if arch["posemb"] == "learn":
    pos = np.asarray(params["encoder"]["pos_embed"], np.float32)
  else:
    pos = sincos_table(arch["width"], grid)
  state_dict["pos_embed"] = np.ascontiguousarray(pos)
  if include_decoder:
    state_dict["decoder_pos_embed"] = sincos_table(arch["decoder"]["width"], grid)
  return state_dict
