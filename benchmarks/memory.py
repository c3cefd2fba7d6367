"""Peak memory of a memmit run for K = 1, 2, 4, 8 shards, and its ratio to K = 1.

Each K runs in its own process (peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU), with
the same model, data, batch size and number of optimizer steps per shard. Usage:
    python benchmarks/memory.py [--channels 128,256,256,256 --batch_size 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

import torch

from common import add_model_args, make_setup


def measure(args) -> dict:
    from memmit.config import MemmitConfig
    from memmit.cli import run

    cfg = MemmitConfig(pretrained_model_name_or_path=args.pipe, dataset_name=args.data, output_dir=tempfile.mkdtemp(),
                       num_shards=args.single, num_rounds=2, local_steps=2, train_batch_size=args.batch_size,
                       center_crop=True, report_to="none", checkpointing_steps=None, num_validation_images=0)
    run(cfg)
    peak = {"cpu_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipe", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(args)))
        return
    pipe, data = make_setup(args)
    params = sum(p.numel() for p in __import__("diffusers").UNet2DModel.from_pretrained(pipe, subfolder="unet").parameters())
    print(f"UNet {params / 1e6:.2f}M parameters ({params * 4 / 2**20:.0f} MiB fp32), batch {args.batch_size}")
    base = None
    for k in (1, 2, 4, 8):
        out = subprocess.run([sys.executable, __file__, "--single", str(k), "--pipe", pipe, "--data", data,
                              "--batch_size", str(args.batch_size)], capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])
        key = "cuda_mib" if "cuda_mib" in peak else "cpu_rss_mib"
        base = base or peak[key]
        print(f"K={k}: peak {key} {peak[key]:8.1f}  ratio to K=1 {peak[key] / base:.3f}")


if __name__ == "__main__":
    main()
