"""MegaVLA: train vision-language-action models with human video as another embodiment.

The script folders `kernels/`, `launch/` and `data_shards/` are installed as subpackages of
`megavla` (``megavla.kernels`` ...) because top-level modules named ``kernels``/``launch`` are
taken on PyPI; the preset folder `configs/` ships the same way, as ``megavla.configs`` (its YAML files
are package data, found through importlib.resources: megavla/config/shipped.py).
"""
from setuptools import setup

SUBPACKAGES = {
    "megavla.kernels": "kernels",
    "megavla.launch": "launch",
    "megavla.data_shards": "data_shards",
    "megavla.configs": "configs",
}

# `megavla data import` (LeRobot parquet + AV1/H.264 video, EgoDex HDF5). pyarrow >= 22 needs
# numpy >= 2, which openpi-client (numpy < 2, a test dependency) rules out.
IMPORT_DEPS = ["pyarrow>=15,<22", "av>=12", "h5py>=3.8"]

setup(
    name="megavla",
    version="0.1.0",
    description="Vision-language-action training at scale (pi0.5-style, human-to-robot transfer)",
    python_requires=">=3.10",
    packages=[
        "megavla",
        "megavla.config",
        "megavla.data",
        "megavla.model",
        "megavla.tokenizers",
        "megavla.train",
        "megavla.eval",
        "megavla.serving",
        *SUBPACKAGES,
    ],
    package_dir={"megavla": "megavla", **SUBPACKAGES},
    package_data={"megavla.launch": ["*.yaml"], "megavla.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # torch is not capped here: GPU users bring their own build; the README pins the CPU wheel.
        "torch>=2.4",
        "numpy>=1.24",
        "deepspeed>=0.15",
        "webdataset>=0.2.100",
        "sentencepiece>=0.2",
        "submitit>=1.5",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "einops>=0.7",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "pillow>=10",
        "simplejpeg>=1.7",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        # `megavla serve` (openpi's websocket protocol): core, not an extra, so that the command works
        # on a plain install; both are small dependency-free wheels.
        "websockets>=13",
        "msgpack>=1.0",
    ],
    extras_require={
        # triton ships with CUDA torch wheels; on CPU it runs kernels under TRITON_INTERPRET=1.
        "triton": ["triton>=3.0"],
        "gpu": ["flash-attn>=2.6", "triton>=3.0"],
        "import": IMPORT_DEPS,
        # openpi-client drives `megavla serve` in the tests (the real client); note it pins numpy<2.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "triton>=3.0",
                 "openpi-client>=0.1.2", *IMPORT_DEPS],  # the import tests run in CI, not skip
    },
    entry_points={"console_scripts": ["megavla=megavla.cli:main"]},
)
