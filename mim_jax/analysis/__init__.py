"""Model analysis (paper section 4, docs/methods.md §8): CKA, attention distance and entropy,
attention maps and MAE reconstructions. The CLI is `python -m mim_jax.analyze`.

    from mim_jax import analysis

    a = analysis.load_model("/tmp/mim_jax_demo/teacher")          # workdir or converted .npz
    b = analysis.load_model("/tmp/mim_jax_demo/d2mae_student", name="D²-MAE")
    batches = analysis.demo_batches(num_batches=3, batch_size=64, image_size=a.image_size)

    result = analysis.cka_between(a, b, batches)          # .matrix (La, Lb), .layers_a/_b
    analysis.plot_cka(result.matrix, name_a=a.name, name_b=b.name)

    stats = analysis.attention_statistics(a, batches)     # .distance, .entropy (layers, heads)
    analysis.plot_attention_boxes({a.name: stats.distance}, ylabel="attention distance (px)")

    images = analysis.first_images(analysis.data_config("demo"), 4, a.image_size)
    maps = analysis.attention_maps(a, images, query_token=27)   # (n, layers, heads, g, g)
    analysis.plot_attention_maps(images[0], maps[0], query_token=27, patch_size=a.patch_size)

    mae = analysis.load_autoencoder("/tmp/mim_jax_demo/teacher")
    analysis.plot_reconstructions(analysis.reconstruct(mae, images, mask_ratio=0.75))

Other data: `analysis.data_config("tfds:imagenet2012")`, `data_config("folder:/data/in1k",
split="val")`, then `analysis.batches(config, batch_size=..., image_size=..., num_batches=...)`.
Modules: `inputs` (models, data, devices), `cka`, `attention`, `reconstruction`, `plots`.
"""

from mim_jax.analysis.attention import (AttentionStatistics, attention_maps,
                                        attention_statistics, head_statistics, patch_distances)
from mim_jax.analysis.cka import CkaResult, cka_between, cka_of_features
from mim_jax.analysis.inputs import (LoadedAutoencoder, LoadedModel, batches, data_config,
                                     demo_batches, first_images, load_autoencoder, load_model)
from mim_jax.analysis.plots import (plot_attention_boxes, plot_attention_maps, plot_cka,
                                    plot_reconstructions)
from mim_jax.analysis.reconstruction import reconstruct

__all__ = [
    "AttentionStatistics", "CkaResult", "LoadedAutoencoder", "LoadedModel", "attention_maps",
    "attention_statistics", "batches", "cka_between", "cka_of_features", "data_config",
    "demo_batches", "first_images", "head_statistics", "load_autoencoder", "load_model",
    "patch_distances", "plot_attention_boxes", "plot_attention_maps", "plot_cka",
    "plot_reconstructions", "reconstruct",
]
