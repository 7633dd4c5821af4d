"""PyTorch / timm / MAE checkpoints <-> mim_jax params (`python -m mim_jax.convert`)."""

from mim_jax.convert.converted import (Converted, arch_from_config, check_arch, content_hash,
                                       load_converted, save_converted)
from mim_jax.convert.torch_io import (UntrustedPickleError, convert_from_torch, export_to_torch,
                                      read_torch_checkpoint)
