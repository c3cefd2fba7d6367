"""Shared set-up for the benchmarks: a pipeline and a dataset of a chosen size, written to a temp dir."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channels", default="32,64,64", help="UNet block_out_channels (cifar10 DDPM: 128,256,256,256)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--image_channels", type=int, default=3)
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)

def make_unet(channels_csv: str, resolution: int = 32, image_channels: int = 3) -> UNet2DModel:
    """A UNet2DModel with attention at the lowest resolution; 128,256,256,256 is DDPM-CIFAR10's size."""
    channels = tuple(int(c) for c in channels_csv.split(","))
    n = len(channels)
    torch.manual_seed(0)
    return UNet2DModel(sample_size=resolution, in_channels=image_channels, out_channels=image_channels,
                       block_out_channels=channels, layers_per_block=2 if n > 3 else 1,
                       norm_num_groups=min(32, channels[0]),
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1))

def make_setup(args, root: Path | None = None) -> tuple[str, str]:
    """(pipeline dir, dataset dir) for the sizes in args; the images are seeded noise."""
    root = Path(root or tempfile.mkdtemp(prefix="memmit-bench-"))
    unet = make_unet(args.channels, args.resolution, args.image_channels)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "pipe")
    rng = np.random.RandomState(0)
    mode = {1: "L", 3: "RGB"}[args.image_channels]
    shape = (args.resolution, args.resolution) + ((3,) if args.image_channels == 3 else ())
    images = [Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode) for _ in range(args.num_samples)]
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(root / "data"))
    return str(root / "pipe"), str(root / "data")

def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()

