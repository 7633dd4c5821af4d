"""Distillation from a frozen teacher: the part D-MAE and D²-MAE add to MAE (docs/methods.md).

A `Distiller` owns the teacher (any converted ViT encoder or mim_jax run, or a
random one for benchmarks), the learnable head / hidden mappings (params under
'distill', trained with the student) and the loss terms. A pre-training task
composes it: `tasks.mae.MaeTask` with task 'dmae' or 'd2mae'. The teacher runs
on the student's kept patches in the student's order, under `stop_gradient`, in
the same jitted step; its params are a frozen input of that step.
"""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from mim_jax import flops
from mim_jax.convert import converted
from mim_jax.errors import ConfigError, UserError
from mim_jax.models import registry, scan
from mim_jax.models.vit import VARIANTS, VisionTransformer
from mim_jax.objectives import distillation
from mim_jax.trainer.tree import flatten_with_names, shape_problems

LayerPairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Which layers are distilled and how much each kind of term weighs."""
  attn_pairs: LayerPairs = ((12, 12),)
  hidden_pairs: LayerPairs = ()
  attn_weight: float = 1.0
  hidden_weight: float = 1.0

  @classmethod
  def from_config(cls, distill: ml_collections.ConfigDict) -> "DistillSpec":
    def pairs(name: str) -> LayerPairs:
      value = distill[name]
      if not isinstance(value, (tuple, list)) or not all(
          isinstance(pair, (tuple, list)) and len(pair) == 2 and
          all(isinstance(layer, numbers.Integral) and not isinstance(layer, bool)
              for layer in pair)
          for pair in value):
        # A single pair needs its trailing comma: ((12, 12)) is the flat (12, 12).
        raise ConfigError(f"distill.{name}={value!r} must be a tuple of (student layer, "
                          f"teacher layer) pairs of integers, e.g. '((12, 12),)' (one pair "
                          f"needs the trailing comma)")
      return tuple((int(pair[0]), int(pair[1])) for pair in value)
    return cls(pairs("attn_pairs"), pairs("hidden_pairs"), float(distill.attn_weight),
               float(distill.hidden_weight))

  @property
  def student_layers(self) -> tuple[int, ...]:
    return tuple(sorted({s for s, _ in self.attn_pairs + self.hidden_pairs}))

  @property
  def teacher_layers(self) -> tuple[int, ...]:
    return tuple(sorted({t for _, t in self.attn_pairs + self.hidden_pairs}))


def mapping_name(kind: str, student_layer: int, teacher_layer: int) -> str:
  return f"{kind}_s{student_layer}_t{teacher_layer}"


def init_mappings(rng: jax.Array, spec: DistillSpec, student: VisionTransformer,
                  teacher: VisionTransformer) -> dict[str, Any]:
  """The 'distill' params: one (h_s, h_t) head mapping per attention pair, one (d_s, d_t)
  linear map per hidden pair."""
  shapes = {mapping_name("attn", s, t): (student.num_heads, teacher.num_heads)
            for s, t in spec.attn_pairs}
  shapes.update({mapping_name("hidden", s, t): (student.width, teacher.width)
                 for s, t in spec.hidden_pairs})
  keys = jax.random.split(rng, max(len(shapes), 1))
  return {name: {"kernel": distillation.mapping_init(key, shape)}
          for key, (name, shape) in zip(keys, sorted(shapes.items()))}


def teacher_forward(teacher: VisionTransformer, teacher_params: Any, images: jax.Array,
                    ids_keep: jax.Array, spec: DistillSpec) -> dict[str, Any]:
  """The frozen teacher on the student's kept patches, with the layers `spec` distils."""
  taught = teacher.apply({"params": scan.apply_layout(teacher_params, teacher)}, images,
                         ids_keep=ids_keep, capture_layers=spec.teacher_layers)
  return jax.lax.stop_gradient(taught)


def distillation_terms(spec: DistillSpec, mappings: dict[str, Any], student: dict[str, Any],
                       taught: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`attn_weight * sum(L_attn) + hidden_weight * sum(L_hidden)` and the two sums.

  Args:
    mappings: the 'distill' params (one kernel per layer pair).
    student, taught: encoder outputs of the student and the teacher on the same tokens,
      with 'attn_logits' and 'hidden' of the layers `spec` distils.

  Returns:
    (weighted total, terms) with 'loss_attn' / 'loss_hidden' when configured (each the
    sum over its layer pairs, as the reference adds them), float32.
  """
  terms, total = {}, jnp.zeros((), jnp.float32)
  kinds = (("attn", spec.attn_pairs, spec.attn_weight, "attn_logits",
            distillation.attention_distillation_loss),
           ("hidden", spec.hidden_pairs, spec.hidden_weight, "hidden",
            distillation.hidden_distillation_loss))
  for kind, pairs, weight, output, loss_of_pair in kinds:
    if not pairs:
      continue
    terms[f"loss_{kind}"] = sum(
        loss_of_pair(student[output][s], taught[output][t],
                     mappings[mapping_name(kind, s, t)]["kernel"])
        for s, t in pairs)
    total = total + weight * terms[f"loss_{kind}"]
  return total, terms


# ----------------------------------------------------------------------------
# Teacher: load, check against the student and the config, build
# ----------------------------------------------------------------------------
def teacher_encoder_params(source: converted.Converted) -> dict[str, Any]:
  """The encoder params a teacher uses: a D²-MAE student's extra block is dropped."""
  params = dict(source.params["encoder"])
  if source.arch["extra_attention_block"]:
    params.pop(f"blocks_{source.arch['depth']}", None)
  return params


def build_teacher(arch: dict[str, Any], dtype: Any, scan_blocks: bool = False,
                  attention_impl: str = "explicit") -> VisionTransformer:
  """The teacher encoder; never rematerialised (it runs forward only, under stop_gradient).

  `attention_impl` applies to its blocks below the distilled ones (see VisionTransformer).
  """
  return converted.build_encoder(arch, dtype=dtype, scan_blocks=scan_blocks,
                                 attention_impl=attention_impl)


def check_teacher(config: ml_collections.ConfigDict, arch: dict[str, Any],
                  student: VisionTransformer, spec: DistillSpec, origin: str) -> None:
  """Token counts, layer ranges and the expected architecture, before any compilation."""
  variant = config.distill.teacher_variant
  if variant:
    if variant not in VARIANTS:
      raise ConfigError(f"distill.teacher_variant={variant!r} is unknown; choose from "
                        f"{sorted(VARIANTS)} or '' to accept any teacher")
    found = {k: arch[k] for k in VARIANTS[variant]}
    if found != VARIANTS[variant]:
      raise ConfigError(f"the teacher {origin} is a ViT with {found}, but "
                        f"distill.teacher_variant={variant!r} expects {VARIANTS[variant]}; "
                        f"give the right teacher or set distill.teacher_variant=''")
  if arch["patch_size"] != student.patch_size:
    student_tokens = (config.image_size // student.patch_size)**2
    teacher_tokens = (config.image_size // arch["patch_size"])**2
    raise ConfigError(
        f"teacher patch size {arch['patch_size']} and student patch size "
        f"{student.patch_size} give different token counts at image_size={config.image_size} "
        f"({teacher_tokens} vs {student_tokens} patches); attention maps cannot be matched")
  if arch["posemb"] == "learn" and arch["image_size"] != config.image_size:
    raise ConfigError(f"the teacher {origin} has learned position embeddings for "
                      f"{arch['image_size']} px images, but image_size={config.image_size}")
  student_attn = student.depth + int(student.extra_attention_block)
  for s, t in spec.attn_pairs:
    if not 1 <= s <= student_attn:
      raise ConfigError(f"distill.attn_pairs: student layer {s} is outside 1..{student_attn}")
    if not 1 <= t <= arch["depth"]:
      raise ConfigError(f"distill.attn_pairs: teacher layer {t} is outside 1..{arch['depth']}")
  for s, t in spec.hidden_pairs:
    if not 0 <= s <= student.depth:
      raise ConfigError(f"distill.hidden_pairs: student layer {s} is outside 0..{student.depth} "
                        f"(an attention-only block has no representation)")
    if not 0 <= t <= arch["depth"]:
      raise ConfigError(f"distill.hidden_pairs: teacher layer {t} is outside "
                        f"0..{arch['depth']}")


def check_teacher_params(teacher: VisionTransformer, params: dict[str, Any], image_size: int,
                         origin: str) -> None:
  """Every leaf the teacher module needs, with its shape; nothing else."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  wanted = jax.eval_shape(scan.unscanned(teacher).init, jax.random.PRNGKey(0), images)["params"]
  wanted = {k: tuple(v.shape) for k, v in flatten_with_names(wanted).items()}
  found = {k: tuple(v.shape) for k, v in flatten_with_names(params).items()}
  problems = shape_problems(found, wanted)
  if problems:
    report = "; ".join(f"{kind}: {', '.join(sorted(names)[:8])}"
                       for kind, names in problems.items())
    raise UserError(f"the teacher {origin} does not fit its own architecture description "
                    f"({report})")


def validate_distill_config(config: ml_collections.ConfigDict, depth: int) -> None:
  """D-MAE vs D²-MAE consistency: an extra block must be distilled, and only by d2mae."""
  extra = config.distill.extra_attention_block
  if config.task == "d2mae" and not extra:
    raise ConfigError("task='d2mae' needs distill.extra_attention_block=True (the 13th block)")
  if config.task == "dmae" and extra:
    raise ConfigError("distill.extra_attention_block=True is D²-MAE: use task='d2mae'")
  spec = DistillSpec.from_config(config.distill)
  if not spec.attn_pairs and not spec.hidden_pairs:
    raise ConfigError("distill.attn_pairs and distill.hidden_pairs are both empty: nothing "
                      "to distil (use task='mae')")
  if extra and not any(s == depth + 1 for s, _ in spec.attn_pairs):
    raise ConfigError(f"distill.extra_attention_block adds layer {depth + 1}, but no "
                      f"distill.attn_pairs entry distils it: {spec.attn_pairs}")
  if config.distill.attn_weight < 0 or config.distill.hidden_weight < 0:
    raise ConfigError("distill.attn_weight and distill.hidden_weight must be >= 0")
  registry.check_attention_dtype(config.model, teacher_dtype(config),
                                 "distill.teacher_dtype (or model.dtype)")
  if not isinstance(config.distill.get("teacher_scan_blocks", False), bool):
    raise ConfigError(f"distill.teacher_scan_blocks={config.distill.teacher_scan_blocks!r} "
                      f"must be True or False")


def teacher_dtype(config: ml_collections.ConfigDict) -> Any:
  """distill.teacher_dtype, or model.dtype when unset."""
  if config.distill.get("teacher_dtype"):
    return registry.compute_dtype(config.distill.teacher_dtype, "distill.teacher_dtype")
  return registry.compute_dtype(config.model.dtype, "model.dtype")


def default_config() -> ml_collections.ConfigDict:
  """`config.distill`: D-MAE's defaults (student layer 12 <-> teacher layer 12, alpha 1)."""
  return ml_collections.ConfigDict(dict(
      teacher="",  # converted .npz (python -m mim_jax.convert from_torch) or a mim_jax workdir
      teacher_variant="base",  # the architecture the teacher must have; "" accepts any
      attn_pairs=((12, 12),),  # (student layer, teacher layer), 1-based
      attn_weight=1.0,  # alpha
      hidden_pairs=(),  # (student layer, teacher layer), 0 = embeddings; empty = off
      hidden_weight=1.0,
      extra_attention_block=False,  # D²-MAE: an attention-only block depth + 1, distilled
      teacher_dtype=config_dict.placeholder(str),  # compute dtype; None = model.dtype
      teacher_scan_blocks=False,  # nn.scan over the teacher's blocks (no remat: forward only)
  ))


class Distiller:
  """The frozen teacher, the learnable mappings and the distillation terms of a student.

  Args:
    config: the run's config (`config.distill`, `config.image_size`, `config.model`).
    student: the student's encoder (for layer ranges and mapping shapes).
    random_teacher: a randomly initialised teacher of `distill.teacher_variant` instead of
      loading `distill.teacher` (benchmarks: speed does not depend on the weights).
  """

  def __init__(self, config: ml_collections.ConfigDict, student: VisionTransformer, *,
               random_teacher: bool = False):
    validate_distill_config(config, student.depth)
    self.config = config
    self.student = student
    self.spec = DistillSpec.from_config(config.distill)
    if random_teacher:
      if not config.distill.teacher_variant:
        raise ConfigError("without distill.teacher a random teacher is used, which needs "
                          "distill.teacher_variant (e.g. --config.distill.teacher_variant=base)")
      self.source = None
      arch = converted.check_arch({**VARIANTS[config.distill.teacher_variant],
                                   "patch_size": student.patch_size,
                                   "image_size": config.image_size, "source": "random"})
      origin = "(random)"
    else:
      if not config.distill.teacher:
        raise ConfigError(
            "distill.teacher is required: a teacher converted with `python -m mim_jax.convert "
            "from_torch mae_pretrain_vit_base.pth teacher.npz`, or a mim_jax workdir; pass "
            "--config.distill.teacher=PATH")
      self.source = converted.load_converted(config.distill.teacher)
      arch = self.source.arch
      origin = repr(config.distill.teacher)
    check_teacher(config, arch, student, self.spec, origin)
    # Scanning the teacher is its own switch: XLA drops the work after the last
    # distilled layer of an unrolled teacher, not of a scanned one.
    self.teacher = build_teacher(arch, teacher_dtype(config),
                                 config.distill.get("teacher_scan_blocks", False),
                                 registry.attention_impl(config.model))
    if self.source is not None:
      check_teacher_params(self.teacher, teacher_encoder_params(self.source), config.image_size,
                           origin)

  @property
  def student_layers(self) -> tuple[int, ...]:
    """The student layers whose attention logits / representations the terms read."""
    return self.spec.student_layers

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    """The 'distill' params: the head and hidden mappings."""
    return init_mappings(rng, self.spec, self.student, self.teacher)

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'teacher': params}, {'teacher': {'path', 'sha256'}}) — the hash goes in checkpoints."""
    if self.source is None:
      size = self.config.image_size
      images = jnp.zeros((1, size, size, 3), jnp.float32)
      params = scan.unscanned(self.teacher).init(jax.random.PRNGKey(self.config.seed),
                                                 images)["params"]
      return {"teacher": params}, {"teacher": {"path": "random",
                                               "sha256": converted.content_hash(params)}}
    return ({"teacher": teacher_encoder_params(self.source)},
            {"teacher": {"path": self.source.path, "sha256": self.source.sha256}})

  def loss_terms(self, mappings: dict[str, Any], teacher_params: Any, images: jax.Array,
                 ids_keep: jax.Array, student_outputs: dict[str, Any]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted distillation loss and its terms, the teacher on the student's kept
    patches (`ids_keep`, in the student's order) of the same normalised `images`."""
    taught = teacher_forward(self.teacher, teacher_params, images, ids_keep, self.spec)
    return distillation_terms(self.spec, mappings, student_outputs, taught)

  def train_flops_per_image(self, kept: int) -> float:
    """The extra block's forward + backward and the teacher's forward to its last used layer."""
    student = self.student
    extra = 0.0
    if student.extra_attention_block:
      extra = 3 * flops.transformer_block_flops(kept + 1, student.width, attention_only=True)
    teacher = self.teacher
    return extra + flops.vit_encoder_flops(kept, teacher.patch_size, teacher.width,
                                           max(self.spec.teacher_layers), teacher.mlp_ratio)
