r"""Convert ViT weights between PyTorch (timm / MAE / MAE-Lite) and mim_jax.

  python -m mim_jax.convert from_torch IN.safetensors|IN.pth OUT.npz [--num_heads N] \
      [--decoder_num_heads N] [--trust_pickle]
  python -m mim_jax.convert to_torch IN OUT.safetensors|OUT.pth [--include_decoder]

from_torch reads a timm state_dict, an official MAE release or a MAE-Lite
checkpoint (.safetensors, .pth, .pth.tar, .bin) and writes a converted .npz that
training reads without torch. to_torch reads a converted .npz, a mim_jax workdir
or one of its checkpoints/<step> directories and writes a timm state_dict; the
summary prints the `timm.create_model` call that loads it with strict=True.

Prefer .safetensors: it holds tensors only. A .pth is a pickle, which can run
code when read, so it is read weights-only (tensors, containers, numbers and
argparse.Namespace `args`); a file holding anything else is refused. Only
--trust_pickle reads it fully, running whatever code it holds: use it only on a
file you trust, or save the state_dict with safetensors.torch.save_file.
Mistakes (unreadable or refused file, not a ViT, missing or unexpected keys,
NaN/Inf weights to export) are one line on stderr and exit status 2.
"""

import argparse

from absl import app
from absl.flags import argparse_flags

from mim_jax import cli
from mim_jax.convert import torch_io


def _positive(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


class _ArgumentParser(argparse_flags.ArgumentParser):
  """argparse with mistakes as one `error:` line and exit status 2 (subparsers too)."""

  def error(self, message: str):
    cli.exit_with_error(f"{self.prog}: {message}")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = _ArgumentParser(
      prog="python -m mim_jax.convert",
      description="Convert ViT weights between PyTorch (timm/MAE/MAE-Lite) and mim_jax.")
  commands = parser.add_subparsers(dest="command", required=True)
  from_torch = commands.add_parser(
      "from_torch", help="PyTorch checkpoint -> converted .npz",
      description="Read a timm / MAE / MAE-Lite ViT checkpoint, write a converted .npz.")
  from_torch.add_argument("in_path", metavar="IN",
                          help=".safetensors (preferred), .pth, .pth.tar or .bin")
  from_torch.add_argument("out_path", metavar="OUT.npz")
  from_torch.add_argument("--num_heads", type=_positive, default=None,
                          help="encoder heads (default from the width: 192/384/768 -> 12, "
                               "1024 -> 16)")
  from_torch.add_argument("--decoder_num_heads", type=_positive, default=None,
                          help="MAE decoder heads (default from its width: 96 -> 3, "
                               "192 -> 6, 512 -> 16)")
  from_torch.add_argument("--trust_pickle", action="store_true",
                          help="read a pickled IN fully (weights_only=False), which RUNS ANY "
                               "CODE IT HOLDS; only for files you trust (default: weights-only, "
                               "refusing anything else)")
  to_torch = commands.add_parser(
      "to_torch", help="converted .npz or mim_jax workdir -> timm state_dict",
      description="Write a timm VisionTransformer state_dict (.pth or .safetensors).")
  to_torch.add_argument("in_path", metavar="IN",
                        help="converted .npz, mim_jax workdir or checkpoints/<step> dir")
  to_torch.add_argument("out_path", metavar="OUT",
                        help=".safetensors (recommended: tensors only, no pickle) or .pth")
  to_torch.add_argument("--include_decoder", action="store_true",
                        help="also write the MAE decoder (MAE's key names)")
  return parser.parse_args(argv[1:])


def main(args: argparse.Namespace) -> None:
  def run():
    if args.command == "from_torch":
      summary = torch_io.convert_from_torch(args.in_path, args.out_path,
                                            num_heads=args.num_heads,
                                            decoder_num_heads=args.decoder_num_heads,
                                            trust_pickle=args.trust_pickle)
    else:
      summary = torch_io.export_to_torch(args.in_path, args.out_path,
                                         include_decoder=args.include_decoder)
    print(summary, flush=True)

  cli.run_reporting_user_errors(run)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_args)
