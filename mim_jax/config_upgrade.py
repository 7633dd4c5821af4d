"""Configs stored in checkpoints by earlier versions, read in today's layout.

A run's config is saved as JSON in every checkpoint's metadata; readers of old
workdirs (teachers, fine-tuning inits, export, analysis) upgrade it first:

* before per-method sub-trees: `norm_pix_loss`, `model.decoder` and
  `model.decoder_layer` were MAE's and are now `mae.*`; `model.extra_attention_block`
  was D²-MAE's and is now `distill.extra_attention_block`;
* before the backbone registry: `model.name` was implicitly 'vit'.
"""

import copy
from typing import Any


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
  """A copy of a stored config (a plain dict from JSON) in the current layout."""
  config = copy.deepcopy(config)
  model = config.setdefault("model", {})
  model.setdefault("name", "vit")
  pretraining = config.get("task") in ("mae", "dmae", "d2mae") or "decoder" in model
  if pretraining and "mae" not in config:
    config["mae"] = {"norm_pix_loss": config.pop("norm_pix_loss", True),
                     "decoder": model.pop("decoder", None),
                     "decoder_layer": model.pop("decoder_layer", None)}
  if "extra_attention_block" in model:
    extra = model.pop("extra_attention_block")
    if "distill" in config:
      config["distill"].setdefault("extra_attention_block", extra)
  return config
