"""memmit training throughput against a diffusers-style plain fine-tuning loop on the same model and data.

The plain loop reads its images through a `torch.utils.data.DataLoader` with the same number of workers as
memmit's --dataloader_num_workers (`--workers`), and a third arm trains on images already on the device (the
compute limit: no decoding at all). Prints samples/s of each and memmit / plain for K = 1, 4 with AGC on and
off. memmit's rate is marginal: (2S - S) steps over the time difference of a 2S-step and an S-step run, so the
fixed costs (loading, export) drop out; the plain loops are timed from their first batch on. Usage:
    python benchmarks/train_throughput.py [--steps 64] [--workers 2] [--channels 128,256,256,256 --batch_size 64]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch
from diffusers import DDPMPipeline

from common import add_model_args, make_setup, reset_accelerate
from memmit.config import MemmitConfig
from memmit.data.neighbours import default_device
from memmit.train.setup import build_trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TransformedImages(torch.utils.data.Dataset):
    """diffusers' train_unconditional data path without torchvision: decode, center crop, scale."""

    def __init__(self, data_dir: str, args):
        import datasets
        from memmit.data.transform import ImageTransform

        self.ds = datasets.load_from_disk(data_dir)
        self.transform = ImageTransform(args.resolution, args.image_channels, center_crop=True)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.ds[i]["image"])


def plain_loop(pipe_dir: str, data_dir: str, args, resident: bool = False) -> float:
    """The diffusers train_unconditional inner loop; returns samples/s. `resident`: every image transformed
    once and kept on the device, batches drawn from there."""
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    device = default_device()
    unet, sched = pipe.unet.to(device).train(), pipe.scheduler
    images = TransformedImages(data_dir, args)
    if resident:
        everything = torch.stack([images[i] for i in range(len(images))]).to(device)
        gen = torch.Generator().manual_seed(0)
        batches = (everything[torch.randint(0, len(everything), (args.batch_size,), generator=gen).to(device)]
                   for _ in itertools.count())
    else:
        loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             pin_memory=device.type == "cuda")
        batches = (batch.to(device, non_blocking=True) for _ in itertools.count() for batch in loader)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    next(batches)  # workers started, first batch made: steady state from here
    sync()
    start = time.perf_counter()
    for _, x0 in zip(range(args.steps), batches):
        noise = torch.randn(x0.shape, device=device)
        t = torch.randint(0, 1000, (len(x0),), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            pred = unet(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def memmit_seconds(pipe_dir: str, data_dir: str, args, steps: int, num_shards: int = 1, **options) -> float:
    """Seconds of Trainer.train() for `steps` optimizer steps in 2 rounds (loading and export excluded)."""
    reset_accelerate()
    cfg = MemmitConfig(pretrained_model_name_or_path=pipe_dir, dataset_name=data_dir, output_dir=tempfile.mkdtemp(),
                       num_shards=num_shards, num_rounds=2, local_steps=max(1, steps // (2 * num_shards)),
                       train_batch_size=args.batch_size, center_crop=True, report_to="none", checkpointing_steps=None,
                       num_validation_images=0, mixed_precision=args.mixed_precision,
                       dataloader_num_workers=args.workers, **options)
    trainer = build_trainer(cfg)
    sync()
    start = time.perf_counter()
    trainer.train()
    sync()
    return time.perf_counter() - start


def memmit_rate(pipe_dir: str, data_dir: str, args, **options) -> float:
    """Marginal samples/s: S more steps over the time they add."""
    short = memmit_seconds(pipe_dir, data_dir, args, args.steps, **options)
    long = memmit_seconds(pipe_dir, data_dir, args, 2 * args.steps, **options)
    return args.steps * args.batch_size / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=64, help="S; a multiple of 16 keeps every K's turns even")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers of the plain loop and memmit")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    pipe_dir, data_dir = make_setup(args)
    plain_loop(pipe_dir, data_dir, argparse.Namespace(**{**vars(args), "steps": 3}))  # warm-up
    plain = plain_loop(pipe_dir, data_dir, args)
    resident = plain_loop(pipe_dir, data_dir, args, resident=True)
    print(f"device {default_device()}, channels {args.channels}, {args.resolution}px, batch {args.batch_size}, "
          f"{args.steps} steps, {args.workers} workers, precision {args.mixed_precision}")
    print(f"{'arm':<26}{'samples/s':>12}{'vs plain':>10}")
    print(f"{'plain loop (DataLoader)':<26}{plain:>12.1f}{1.0:>10.2f}")
    print(f"{'plain, resident images':<26}{resident:>12.1f}{resident / plain:>10.2f}")
    for k in (1, 4):
        for lam in (0.0, 0.5):
            rate = memmit_rate(pipe_dir, data_dir, args, num_shards=k, agc_lambda=lam)
            print(f"{f'memmit K={k} AGC={lam}':<26}{rate:>12.1f}{rate / plain:>10.2f}")


if __name__ == "__main__":
    main()
