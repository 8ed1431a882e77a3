"""Installs mimkit: masked-image-modelling pretraining of Vision Transformers."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="mimkit",
    version="0.1.0",
    description="Self-supervised masked-autoencoder pretraining of Vision Transformers",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mimkit", "mimkit.*"]),
    package_data={"mimkit.train": ["base.yaml"]},  # the base recipe every recipe is read over
    # The upper bounds keep a fresh resolve on torch 2.14.1 + torchvision 0.29.1, the newest pair
    # that imports together here (torchvision 0.29.2 wants torch 2.15, which pip cannot install).
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.29.2",
        "timm>=1.0.9,<2",
        "webdataset>=0.2.86,<2",
        "deepspeed>=0.15,<1",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=9",
        "matplotlib>=3.7",
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.14"],  # run.loggers: [tensorboard]
        "hf": ["datasets>=2.14"],  # data.source: hf:PATH (a dataset saved with save_to_disk)
        "wandb": ["wandb>=0.17"],  # run.loggers: [wandb]
        "dev": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14", "wandb>=0.17", "datasets>=2.14"],
    },
    entry_points={"console_scripts": ["mimkit=mimkit.cli.main:main"]},
)
