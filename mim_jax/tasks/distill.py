"""D-MAE and D²-MAE: MAE pre-training distilled from a frozen teacher (method.md §3-§4).

The student is the MAE of `pretrain.build_mae` (for D²-MAE with 13 blocks and the
decoder on block 8); the teacher is any converted ViT encoder. Both see the same
normalised images and the same kept patches in the same order. Params are
{'encoder', 'decoder', 'distill'}: the learnable mappings live under 'distill',
apart from the encoder, and are trained with it; the teacher's params are a
separate, frozen input of the step.

`distillation_loss_terms` is the public entry point for checking numbers against
the PyTorch reference: params, teacher params, normalised images and masking
noise in, exactly the loss the training step minimises out.
"""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import flops, masking
from mim_jax.convert import converted
from mim_jax.errors import ConfigError, UserError
from mim_jax.models import scan
from mim_jax.models.mae import MaskedAutoencoder
from mim_jax.models.vit import VARIANTS, VisionTransformer
from mim_jax.objectives import distillation, reconstruction
from mim_jax.tasks.pretrain import (MaePretrainTask, attention_impl, autoencoder_params,
                                    check_attention_dtype, compute_dtype, normalize_images)
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


def distillation_loss_terms(model: MaskedAutoencoder, teacher: VisionTransformer,
                            params: dict[str, Any], teacher_params: Any, images: jax.Array,
                            noise: jax.Array, spec: DistillSpec, *, mask_ratio: float = 0.75,
                            norm_pix_loss: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`loss = L_rec + attn_weight * sum(L_attn) + hidden_weight * sum(L_hidden)`.

  Args:
    params: the student's {'encoder', 'decoder', 'distill'} (per-block layout).
    teacher_params: the teacher encoder's params (per-block layout; never differentiated).
    images: normalised float32 (B, H, W, 3); noise: (B, L) masking noise shared by both
      models.

  Returns:
    (loss, terms) with 'loss_rec' and, when configured, 'loss_attn' and 'loss_hidden'
    (each the sum over its layer pairs, as the reference adds them), all float32
    whatever the compute dtypes of the student and the teacher.
  """
  mask = masking.mask_from_noise(noise, mask_ratio)
  pred, student = model.apply({"params": scan.apply_layout(autoencoder_params(params), model)},
                              images, mask.ids_keep, mask.ids_restore,
                              capture_layers=spec.student_layers)
  taught = teacher_forward(teacher, teacher_params, images, mask.ids_keep, spec)
  target = reconstruction.patchify(images, model.encoder.patch_size)
  terms = {"loss_rec": reconstruction.mae_loss(pred, target, mask.mask, norm_pix_loss)}
  loss = terms["loss_rec"]
  kinds = (("attn", spec.attn_pairs, spec.attn_weight, "attn_logits",
            distillation.attention_distillation_loss),
           ("hidden", spec.hidden_pairs, spec.hidden_weight, "hidden",
            distillation.hidden_distillation_loss))
  for kind, pairs, weight, output, loss_of_pair in kinds:
    if not pairs:
      continue
    terms[f"loss_{kind}"] = sum(
        loss_of_pair(student[output][s], taught[output][t],
                     params["distill"][mapping_name(kind, s, t)]["kernel"])
        for s, t in pairs)
    loss = loss + weight * terms[f"loss_{kind}"]
  return loss, terms


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
  return VisionTransformer(**converted.encoder_kwargs(arch), dtype=dtype, scan_blocks=scan_blocks,
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
  extra = config.model.extra_attention_block
  if config.task == "d2mae" and not extra:
    raise ConfigError("task='d2mae' needs model.extra_attention_block=True (the 13th block)")
  if config.task == "dmae" and extra:
    raise ConfigError("model.extra_attention_block=True is D²-MAE: use task='d2mae'")
  spec = DistillSpec.from_config(config.distill)
  if not spec.attn_pairs and not spec.hidden_pairs:
    raise ConfigError("distill.attn_pairs and distill.hidden_pairs are both empty: nothing "
                      "to distil (use task='mae')")
  if extra and not any(s == depth + 1 for s, _ in spec.attn_pairs):
    raise ConfigError(f"model.extra_attention_block adds layer {depth + 1}, but no "
                      f"distill.attn_pairs entry distils it: {spec.attn_pairs}")
  if config.distill.attn_weight < 0 or config.distill.hidden_weight < 0:
    raise ConfigError("distill.attn_weight and distill.hidden_weight must be >= 0")
  check_attention_dtype(attention_impl(config.model), teacher_dtype(config),
                        "distill.teacher_dtype (or model.dtype)")
  if not isinstance(config.distill.get("teacher_scan_blocks", False), bool):
    raise ConfigError(f"distill.teacher_scan_blocks={config.distill.teacher_scan_blocks!r} "
                      f"must be True or False")


def teacher_dtype(config: ml_collections.ConfigDict) -> Any:
  """distill.teacher_dtype, or model.dtype when unset."""
  if config.distill.get("teacher_dtype"):
    return compute_dtype(config.distill.teacher_dtype, "distill.teacher_dtype")
  return compute_dtype(config.model.dtype, "model.dtype")


class DistillationTask(MaePretrainTask):
  """D-MAE (task 'dmae') and D²-MAE (task 'd2mae').

  Args:
    random_teacher: use a randomly initialised teacher of `distill.teacher_variant`
      instead of loading `distill.teacher` (for benchmarks: speed does not depend on
      the weights).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, random_teacher: bool = False):
    super().__init__(config)
    validate_distill_config(config, self.model.encoder.depth)
    self.spec = DistillSpec.from_config(config.distill)
    if random_teacher:
      if not config.distill.teacher_variant:
        raise ConfigError("without distill.teacher a random teacher is used, which needs "
                        "distill.teacher_variant (e.g. --config.distill.teacher_variant=base)")
      self.source = None
      arch = converted.check_arch({**VARIANTS[config.distill.teacher_variant],
                                   "patch_size": self.patch_size,
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
    check_teacher(config, arch, self.model.encoder, self.spec, origin)
    # Scanning the teacher is its own switch: XLA drops the work after the last
    # distilled layer of an unrolled teacher, not of a scanned one.
    self.teacher = build_teacher(arch, teacher_dtype(config),
                                 config.distill.get("teacher_scan_blocks", False),
                                 attention_impl(config.model))
    if self.source is not None:
      check_teacher_params(self.teacher, teacher_encoder_params(self.source), config.image_size,
                           origin)

  def init_params(self, rng: jax.Array) -> Any:
    mae_rng, mapping_rng = jax.random.split(rng)
    params = super().init_params(mae_rng)
    return {**params, "distill": init_mappings(mapping_rng, self.spec, self.model.encoder,
                                               self.teacher)}

  def load_frozen(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'teacher': params}, {'teacher': {'path', 'sha256'}}) — the hash goes in checkpoints."""
    if self.source is None:
      images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
      params = scan.unscanned(self.teacher).init(jax.random.PRNGKey(self.config.seed),
                                                 images)["params"]
      return {"teacher": params}, {"teacher": {"path": "random",
                                               "sha256": converted.content_hash(params)}}
    return ({"teacher": teacher_encoder_params(self.source)},
            {"teacher": {"path": self.source.path, "sha256": self.source.sha256}})

  def train_flops_per_image(self) -> float:
    """Student forward + backward (3x) plus the teacher's forward up to its last used layer."""
    kept = masking.num_kept(self.num_patches, self.config.mask_ratio)
    student = super().train_flops_per_image()
    enc = self.model.encoder
    if enc.extra_attention_block:
      student += 3 * flops.transformer_block_flops(kept + 1, enc.width, attention_only=True)
    teacher = self.teacher
    teacher_flops = flops.vit_encoder_flops(kept, teacher.patch_size,
                                            teacher.width, max(self.spec.teacher_layers),
                                            teacher.mlp_ratio)
    return student + teacher_flops

  def loss_terms(self, params: Any, teacher_params: Any, images: jax.Array,
                 noise: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's loss for normalised images and given masking noise (for notebooks)."""
    return distillation_loss_terms(self.model, self.teacher, params, teacher_params, images,
                                   noise, self.spec, mask_ratio=self.config.mask_ratio,
                                   norm_pix_loss=self.config.norm_pix_loss)

  def loss_fn(self, params: Any, frozen: dict[str, Any], batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    images = normalize_images(batch["image"])
    noise = self.masking_noise(rng, images.shape[0])
    return self.loss_terms(params, frozen["teacher"], images, noise)
