"""memmit training throughput against a plain fine-tuning loop on the same model and data.

Prints samples/s of each and the ratio memmit / plain, for AGC on and off and K = 1, 4, 8. memmit's
rate is marginal: (2S - S) steps over the time difference of a 2S-step and an S-step run, so the
fixed costs (loading, export) drop out and what remains is the loop with its shard turns. Usage:
    python benchmarks/train_throughput.py [--steps 64] [--channels 128,256,256,256 --batch_size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import DDPMPipeline

from common import add_model_args, make_setup, reset_accelerate
from memmit.config import MemmitConfig
from memmit.metrics import default_device
from memmit.trainer import Trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_loop(pipe_dir: str, data_dir: str, args) -> float:
    """The diffusers train_unconditional inner loop, data decoded the same way; returns samples/s."""
    import datasets
    from memmit.data import ImageTransform

    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    unet, sched = pipe.unet.to(default_device()).train(), pipe.scheduler
    ds = datasets.load_from_disk(data_dir)
    transform = ImageTransform(args.resolution, args.image_channels, center_crop=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    sync()
    start = time.perf_counter()
    for step in range(args.steps):
        ids = torch.randint(0, len(ds), (args.batch_size,), generator=gen).tolist()
        x0 = torch.stack([transform(img) for img in ds[ids]["image"]]).to(default_device())
        noise = torch.randn(x0.shape, generator=gen).to(default_device())
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(default_device())
        with torch.autocast(default_device().type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            pred = unet(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def memmit_seconds(pipe_dir: str, data_dir: str, args, num_shards: int, agc_lambda: float, steps: int) -> float:
    reset_accelerate()
    cfg = MemmitConfig(pretrained_model_name_or_path=pipe_dir, dataset_name=data_dir, output_dir=tempfile.mkdtemp(),
                       num_shards=num_shards, num_rounds=2, local_steps=max(1, steps // (2 * num_shards)),
                       agc_lambda=agc_lambda, train_batch_size=args.batch_size, center_crop=True, report_to="none",
                       checkpointing_steps=None, num_validation_images=0, mixed_precision=args.mixed_precision)
    trainer = Trainer(cfg)
    sync()
    start = time.perf_counter()
    trainer.train()
    sync()
    return time.perf_counter() - start


def memmit_rate(pipe_dir: str, data_dir: str, args, num_shards: int, agc_lambda: float) -> float:
    short = memmit_seconds(pipe_dir, data_dir, args, num_shards, agc_lambda, args.steps)
    long = memmit_seconds(pipe_dir, data_dir, args, num_shards, agc_lambda, 2 * args.steps)
    return args.steps * args.batch_size / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=64, help="S; a multiple of 16 keeps every K's turns even")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    pipe_dir, data_dir = make_setup(args)
    plain_loop(pipe_dir, data_dir, argparse.Namespace(**{**vars(args), "steps": 3}))  # warm-up
    plain = plain_loop(pipe_dir, data_dir, args)
    print(f"device {default_device()}, channels {args.channels}, {args.resolution}px, batch {args.batch_size}, "
          f"{args.steps} steps, precision {args.mixed_precision}")
    print(f"{'arm':<22}{'samples/s':>12}{'vs plain':>10}")
    print(f"{'plain loop':<22}{plain:>12.1f}{1.0:>10.2f}")
    for k in (1, 4, 8):
        for lam in (0.0, 0.5):
            rate = memmit_rate(pipe_dir, data_dir, args, k, lam)
            print(f"{f'memmit K={k} AGC={lam}':<22}{rate:>12.1f}{rate / plain:>10.2f}")


if __name__ == "__main__":
    main()
