"""Analytic matmul FLOPs of the models (for model-FLOPs utilisation).

Counts 2 x multiply-adds of every matmul (linear layers, attention products,
patch projection); norms, softmax and GELU are ignored, as is usual for MFU.
A training step is counted as 3 x the forward pass (forward + 2 x backward).
"""


def transformer_block_flops(tokens: int, width: int, mlp_ratio: float = 4.0,
                            attention_only: bool = False) -> float:
  qkv = 2 * tokens * width * 3 * width
  logits = 2 * tokens * tokens * width
  if attention_only:
    return qkv + logits
  weighted_sum = 2 * tokens * tokens * width
  proj = 2 * tokens * width * width
  mlp = 2 * 2 * tokens * width * int(width * mlp_ratio)
  return qkv + logits + weighted_sum + proj + mlp


def vit_encoder_flops(patches: int, patch_size: int, width: int, depth: int,
                      mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs on `patches` patches (all of them, or those MAE keeps: masked
  patches are never projected): patch projection, blocks on patches + cls."""
  embed = 2 * patches * 3 * patch_size**2 * width
  return embed + depth * transformer_block_flops(patches + 1, width, mlp_ratio)


def mae_decoder_flops(num_patches: int, kept_patches: int, patch_size: int, enc_width: int,
                      width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  tokens = num_patches + 1
  embed = 2 * (kept_patches + 1) * enc_width * width
  pred = 2 * tokens * width * 3 * patch_size**2
  return embed + depth * transformer_block_flops(tokens, width, mlp_ratio) + pred


def mae_train_flops_per_image(num_patches: int, kept_patches: int, patch_size: int,
                              width: int, depth: int, dec_width: int, dec_depth: int,
                              mlp_ratio: float = 4.0) -> float:
  forward = (vit_encoder_flops(kept_patches, patch_size, width, depth, mlp_ratio) +
             mae_decoder_flops(num_patches, kept_patches, patch_size, width, dec_width,
                               dec_depth, mlp_ratio))
  return 3 * forward
