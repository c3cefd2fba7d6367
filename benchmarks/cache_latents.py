"""Text-to-image training throughput with and without --cache_latents, measured in one run; and the cache's build
at scale.

A Stable Diffusion pipeline of chosen sizes (random weights: speed does not depend on them) on the text-to-image
testbed's captioned digits; memmit's marginal rate (as in train_throughput.py) without the cache, and with a cache
built beforehand (its one-off build time printed apart). Usage:
    python benchmarks/cache_latents.py [--vae_channels 64,128,256 --unet_channels 64,128 --resolution 64]

With `--build_sizes N ...`: the cache of N distinct captioned images (features_scale.py's digits, each with a
caption of its own) built from nothing by one process and by two gloo processes (one thread each), each run in its
own processes: seconds and peak RSS (the largest process's), and whether both builds hold the same latents.
    python benchmarks/cache_latents.py --build_sizes 2000 8000 32000 --resolution 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
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


def captioned(size: int, folder: Path) -> str:
    """features_scale.py's `size` distinct digits, each with its own caption."""
    import datasets

    from features_scale import make_dataset

    path = folder / f"captioned-{size}"
    if not path.is_dir():
        ds = datasets.load_from_disk(make_dataset(size, folder))
        ds.add_column("text", [f"digit image number {i}" for i in range(size)]).save_to_disk(str(path))
    return str(path)


def build_one(pipe: str, data: str, processes: int, rank: int, out: str) -> None:
    """One process of a cache build (MEMMIT_CACHE set by the caller): its seconds and peak RSS to `out`."""
    import datasets

    from features_scale import peak_rss_mib
    from memmit.config import MemmitConfig
    from memmit.data.content import sample_digests
    from memmit.families import load_task
    from memmit.families.latents import cached_inputs
    from memmit.workers import Workers

    workers = Workers()
    if processes > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=processes)
        workers = Workers(rank, processes, dist.barrier)
    cfg = MemmitConfig(pretrained_model_name_or_path=pipe, dataset_name=data, output_dir="unused",
                       caption_column="text", center_crop=True)
    task = load_task(cfg)
    task.prepare(torch.device("cpu"), torch.float32)
    ds = datasets.load_from_disk(data)
    task.use_training_captions(ds["text"])
    content = sample_digests(ds, "image", "text", show_progress=False)
    start = time.perf_counter()
    cached = cached_inputs(task, ds, content, "image", "text", False, torch.device("cpu"), 20.0, workers,
                           show_progress=False)
    seconds = time.perf_counter() - start
    Path(out, f"{rank}.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(),
                                                     "directory": cached.directory}))


def build_at_scale(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="memmit-bench-cache-"))
    pipe = make_pipeline(root / "pipe", args)
    print(f"VAE {args.vae_channels} at {args.resolution} px; seconds and peak RSS of a cache build from nothing")
    print(f"{'images':>8} {'processes':>9} {'s':>8} {'peak RSS MiB':>13} same latents")
    for size in args.build_sizes:
        data = captioned(size, root)
        digests = {}
        for processes in (1, 2):
            out = root / f"run-{size}-{processes}"
            out.mkdir()
            # One thread a process in both: a convolution's rounding depends on the thread count (1e-6 apart).
            env = dict(os.environ, MEMMIT_CACHE=str(out / "cache"), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(29000 + os.getpid() % 1000), OMP_NUM_THREADS="1")
            procs = [subprocess.Popen([sys.executable, __file__, "--build_one", pipe, data, str(processes), str(rank),
                                       str(out)], env=env) for rank in range(processes)]
            if any(p.wait() for p in procs):
                raise RuntimeError(f"the cache build of {size} images on {processes} processes failed")
            runs = [json.loads((out / f"{rank}.json").read_text()) for rank in range(processes)]
            digests[processes] = latents_digest(Path(runs[0]["directory"]))
            print(f"{size:>8,} {processes:>9} {runs[0]['seconds']:>8.1f} "
                  f"{max(r['peak_rss_mib'] for r in runs):>13.0f} {'yes' if digests[processes] == digests[1] else 'NO'}",
                  flush=True)


def latents_digest(directory: Path) -> str:
    """A digest of every latent in the cache, in row order."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for chunk in sorted(directory.glob("latents-*.safetensors")):
        for name, t in sorted(load_file(chunk).items()):
            h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vae_channels", default="32,64,128")
    parser.add_argument("--unet_channels", default="32,64")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--build_sizes", type=int, nargs="+", help="measure the cache's build at these sizes instead")
    parser.add_argument("--build_one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_one:
        pipe, data, processes, rank, out = args.build_one
        build_one(pipe, data, int(processes), int(rank), out)
        return
    if args.build_sizes:
        build_at_scale(args)
        return
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
