"""Which processes train which shard, and the collectives inside a shard group (docs/method.md).

K >= P: shard k is trained by process k mod P alone (groups of one). K < P: P must be a multiple of K, and shard k
is trained data-parallel by the group of processes k*G .. k*G+G-1, G = P/K (consecutive ranks, so a group stays on
one machine where it can). Each member computes its share of every micro-batch; the group's per-sample losses are
gathered in member order, so every member sees the whole micro-batch as one process with G times the batch would.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

BUCKET = 2**25  # gradient elements summed per collective: 128 MiB of fp32


def group_size(num_shards: int, num_processes: int) -> int:
    """Processes per shard group; refuses a process count that K shards cannot share evenly."""
    if num_shards >= num_processes:
        return 1
    if num_processes % num_shards:
        fits = [k for k in range(1, num_processes + 1) if num_processes % k == 0]
        raise ValueError(f"num_shards={num_shards} does not divide the {num_processes} processes: with fewer shards "
                         f"than processes, each shard is trained by an equal group of them; pass --num_shards "
                         f"{' | '.join(map(str, fits))} (or any number >= {num_processes})")
    return num_processes // num_shards


class ShardGroup:
    """This process's place: `trainer` (which of the P/G parallel shard trainers it belongs to), `rank` in its
    group of `size`; `trainers` in all."""

    def __init__(self, num_shards: int, num_processes: int, process_index: int, device: torch.device):
        self.size = group_size(num_shards, num_processes)
        self.trainers = num_processes // self.size
        self.trainer, self.rank = divmod(process_index, self.size)
        self.device = device
        self.handle = None
        if self.size > 1:
            # Every process creates every group, in the same order (torch.distributed's rule).
            for t in range(self.trainers):
                handle = dist.new_group(list(range(t * self.size, (t + 1) * self.size)))
                if t == self.trainer:
                    self.handle = handle

    @property
    def leads(self) -> bool:
        """The member that adds the group's shard into the round's sum (the others hold the same weights)."""
        return self.rank == 0

    def gather(self, values: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """The members' `values` rows (member j holds counts[j] of them), concatenated in member order, on the CPU."""
        if self.size == 1:
            return values.detach().cpu()
        padded = torch.zeros((max(counts), *values.shape[1:]), dtype=values.dtype, device=self.device)
        padded[:len(values)] = values.detach()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.handle)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()

    @torch.no_grad()
    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every parameter's gradient <- its sum over the group (a member without any counts as zeros), summed in
        buckets: one collective per bucket rather than per tensor, and no second copy of the whole model."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        bucket, filled = [], 0
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            bucket.append(g)
            filled += g.numel()
            if filled >= BUCKET or i + 1 == len(params):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat, group=self.handle)
                for t, summed in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(summed.view_as(t))
                bucket, filled = [], 0
