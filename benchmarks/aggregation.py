"""Aggregation cost against one copy of the weights, and the eval's chunked neighbour search
against the bare matrix product of the same size.

    python benchmarks/aggregation.py [--channels 128,256,256,256] [--queries 10000 --refs 50000]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import make_unet
from memmit.train.ensemble import FlatAverage, floating_tensors
from memmit.data.neighbours import default_device, nearest_neighbours


def timed(fn, repeat: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", default="128,256,256,256")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--refs", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=3072)
    args = parser.parse_args()
    unet = make_unet(args.channels).to(default_device())
    live = floating_tensors(unet)
    avg = FlatAverage(live)

    def one_round():
        for _ in range(args.shards):
            avg.load_into(live)
            avg.add(live, 1.0 / args.shards)
        avg.finish_round()

    copy = timed(lambda: [t.detach().clone() for t in live])
    agg = timed(one_round)
    n = sum(t.numel() for t in live)
    print(f"device {default_device()}: {n / 1e6:.1f}M floats; one copy of the weights {copy * 1e3:.2f} ms; "
          f"a round's aggregation over K={args.shards} (load + add per shard, finish) {agg * 1e3:.2f} ms "
          f"= {agg / copy:.1f} copies, {agg / copy / args.shards:.2f} per shard")

    gen = torch.Generator().manual_seed(0)
    q = torch.rand(args.queries, args.dim, generator=gen)
    r = torch.rand(args.refs, args.dim, generator=gen)
    qd, rd = q.to(default_device()), r.to(default_device())
    bare = timed(lambda: qd @ rd.T, repeat=2)
    search = timed(lambda: nearest_neighbours(q, r, 50), repeat=2)
    print(f"neighbour search {args.queries}x{args.refs}x{args.dim}: bare matmul {bare:.3f} s, "
          f"chunked exact top-50 {search:.3f} s, ratio {search / bare:.2f}")


if __name__ == "__main__":
    main()
