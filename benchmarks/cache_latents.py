"""Text-to-image training throughput with and without --cache_latents, measured in one run.

A Stable Diffusion pipeline of chosen sizes (random weights: speed does not depend on them) on the text-to-image
testbed's captioned digits; memmit's marginal rate (as in train_throughput.py) without the cache, and with a cache
built beforehand (its one-off build time printed apart). Usage:
    python benchmarks/cache_latents.py [--vae_channels 64,128,256 --unet_channels 64,128 --resolution 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from train_throughput import memmit_rate, memmit_seconds, sync
from memmit.data.neighbours import default_device
from memmit.testbeds.text_to_image import LATENT_CHANNELS, build_captioned_dataset, caption_words, text_parts


def channels(csv: str) -> tuple[int, ...]:
    return tuple(int(c) for c in csv.split(","))


def make_pipeline(path: Path, args) -> str:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, text_encoder = text_parts(caption_words())
    vae_channels = channels(args.vae_channels)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS, block_out_channels=vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=2,
                        norm_num_groups=min(32, vae_channels[0]), sample_size=args.resolution)
    unet_channels = channels(args.unet_channels)
    unet = UNet2DConditionModel(sample_size=args.resolution // 2 ** (len(vae_channels) - 1), in_channels=LATENT_CHANNELS,
                                out_channels=LATENT_CHANNELS, block_out_channels=unet_channels, layers_per_block=1,
                                norm_num_groups=min(32, unet_channels[0]), cross_attention_dim=64, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
                                up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDPMScheduler(num_train_timesteps=1000), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vae_channels", default="32,64,128")
    parser.add_argument("--unet_channels", default="32,64")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="memmit-bench-t2i-"))
    os.environ["MEMMIT_CACHE"] = str(root / "cache")
    data = build_captioned_dataset(root / "data", num_unique=64, num_duplicated=2, copies=16)
    pipe = make_pipeline(root / "pipe", args)
    common = dict(caption_column="text", agc_lambda=0.8, random_flip=True)
    sync()
    start = time.perf_counter()
    memmit_seconds(pipe, str(data), args, 2, cache_latents=True, **common)  # builds the cache (and trains 2 steps)
    build = time.perf_counter() - start
    encoded = memmit_rate(pipe, str(data), args, **common)
    cached = memmit_rate(pipe, str(data), args, cache_latents=True, **common)
    print(f"device {default_device()}, VAE {args.vae_channels}, UNet {args.unet_channels}, {args.resolution}px, "
          f"batch {args.batch_size}, {args.steps} steps, {args.workers} workers, precision {args.mixed_precision}")
    print(f"cache build (one-off, with loading and 2 training steps): {build:.1f} s")
    print(f"{'arm':<28}{'samples/s':>12}{'ratio':>8}")
    print(f"{'encoded every step':<28}{encoded:>12.1f}{1.0:>8.2f}")
    print(f"{'--cache_latents':<28}{cached:>12.1f}{cached / encoded:>8.2f}")


if __name__ == "__main__":
    main()
