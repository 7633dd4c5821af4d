r"""Transfer of a pre-trained ViT-Tiny to the paper's downstream sets (paper Table S2).

docs/methods.md §7: SGD momentum 0.9, batch 512, no weight decay / dropout / drop path,
RandomResizedCrop + flip at 224 px, linear warm-up then cosine. Per data set the
sweep is lr in {0.01, 0.03, 0.1} (CIFAR-100: {0.03, 0.1, 0.3}), two schedules
(epochs, warm-up) and layer decay in {1.0, 0.75}. D²-MAE ViT-Tiny reaches
Flowers 96.0, Pets 90.4, Aircraft 80.0, Cars 88.2, CIFAR-100 85.2, iNat18 66.2.

The argument names the data set and, optionally, one point of the sweep (`:demo`
runs the recipe on the embedded digits):
  python -m mim_jax.train --workdir gs://BUCKET/flowers_lr0.03 \
      --config 'configs/transfer_vit_tiny.py:flowers,lr=0.03,schedule=long,layer_decay=0.75' \
      --config.init=gs://BUCKET/d2mae_tiny --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Data sets (TFDS array_record, prepared once with `tfds build NAME --file_format=array_record`):
flowers (oxford_flowers102), pets (oxford_iiit_pet), cars (cars196), cifar100,
inat18 (i_naturalist2018). FGVC-Aircraft is not in the TFDS catalogue: give it as
an image folder, `aircraft` with --config.data.data_dir=ROOT holding
ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg.
"""

from mim_jax import config_defaults

# name: (TFDS name or None for an image folder, classes, eval split, lr grid,
#        (epochs, warm-up) short and long).
DATASETS = {
    "flowers": ("oxford_flowers102", 102, "test", (0.01, 0.03, 0.1), ((150, 30), (250, 50))),
    "pets": ("oxford_iiit_pet", 37, "test", (0.01, 0.03, 0.1), ((70, 14), (150, 30))),
    "aircraft": (None, 100, "test", (0.01, 0.03, 0.1), ((50, 10), (100, 20))),
    "cars": ("cars196", 196, "test", (0.01, 0.03, 0.1), ((50, 10), (100, 20))),
    "cifar100": ("cifar100", 100, "test", (0.03, 0.1, 0.3), ((25, 5), (50, 10))),
    "inat18": ("i_naturalist2018", 8142, "validation", (0.01, 0.03, 0.1), ((50, 10), (100, 20))),
}


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
  if not arg:
    raise ValueError(f"name a data set: configs/transfer_vit_tiny.py:NAME with NAME in "
                     f"{sorted(DATASETS)} (optionally ,lr=X,schedule=short|long,layer_decay=Y)")
  name, *options = arg.split(",")
  if name not in DATASETS:
    raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
  settings = {}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or key not in ("lr", "schedule", "layer_decay"):
      raise ValueError(f"bad option {option!r}; use lr=X, schedule=short|long, layer_decay=Y")
    settings[key] = value
  return name, settings


def get_config(arg: str | None = None):
  if arg == "demo":  # the SGD transfer recipe on the digits, laptop-sized
    config = get_config("cifar100,lr=0.1")
    config = config_defaults.finetune_demo_overrides(config)
    config.data.randaug_magnitude = None
    config.optimizer.base_lr = 0.1 * 256 / 512
    return config
  name, settings = parse_arg(arg)
  tfds_name, num_classes, eval_split, lrs, schedules = DATASETS[name]
  lr = float(settings.get("lr", lrs[1]))
  schedule = settings.get("schedule", "short")
  if schedule not in ("short", "long"):
    raise ValueError(f"schedule={schedule!r}: use short or long")
  epochs, warmup = schedules[schedule == "long"]

  config = config_defaults.finetune_config()
  config.num_classes = num_classes
  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_epochs = float(epochs)
  config.warmup_epochs = float(warmup)
  config.optimizer.update(name="sgd", base_lr=lr * 256 / config.batch_size, end_lr=0.0,
                          weight_decay=0.0, momentum=0.9,
                          layer_decay=float(settings.get("layer_decay", 1.0)))
  config.model.drop_path_rate = 0.0
  config.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  config.data.randaug_magnitude = None
  config.data.color_jitter = 0.0
  config.data.eval_split = eval_split
  if tfds_name is None:
    config.data.kind = "image_folder"
  else:
    config.data.name = tfds_name
  config.eval_every = 1000
  return config
