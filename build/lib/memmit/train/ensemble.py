"""Iterative Ensemble Training's weights: the global average θ̄ and the round's fp32 accumulator.

One live model trains the shards in turn; each finished shard is added into a single flat fp32
accumulator with its weight w_k, so memory does not grow with K. With several processes the
accumulator is summed by one all-reduce of that one flat buffer.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

REDUCE_CHUNK = 2**26  # elements per all-reduce: 256 MiB of fp32


def shard_weights(sizes: Sequence[int], aggregation: str = "size") -> list[float]:
    """w_k = n_k / N (aggregation='size') or 1 / K ('uniform')."""
    if aggregation == "size":
        total = sum(sizes)
        return [n / total for n in sizes]
    if aggregation == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def floating_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every floating-point parameter and buffer, in state_dict order (integer buffers are left alone)."""
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


class FlatAverage:
    """A flat fp32 copy of a list of tensors (θ̄) plus the accumulator of the round's weighted sum."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: Optional[torch.device] = None):
        self.numels = [t.numel() for t in tensors]
        device = device or tensors[0].device
        self.average = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(device)
        self.accumulator = torch.zeros_like(self.average)

    def _chunks(self, flat: torch.Tensor) -> Iterable[torch.Tensor]:
        return flat.split(self.numels)

    @torch.no_grad()
    def load_into(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy θ̄ into the live tensors (cast to their dtype)."""
        for t, src in zip(tensors, self._chunks(self.average)):
            t.data.copy_(src.view_as(t))

    @torch.no_grad()
    def add(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        """accumulator += weight * tensors, tensor by tensor (no second full copy)."""
        for t, acc in zip(tensors, self._chunks(self.accumulator)):
            acc.add_(t.detach().reshape(-1).float(), alpha=weight)

    @torch.no_grad()
    def finish_round(self, reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """θ̄ <- Σ_k w_k θ_k (summed over processes first, when given), then reset the accumulator.

        `reduce_sum` returns its tensor summed across processes; it is applied chunk by chunk, so the
        collective never holds a second copy of the whole model."""
        if reduce_sum is None:
            self.average.copy_(self.accumulator)
        else:
            for avg, acc in zip(self.average.split(REDUCE_CHUNK), self.accumulator.split(REDUCE_CHUNK)):
                avg.copy_(reduce_sum(acc))
        self.accumulator.zero_()

    def state_dict(self, part: str) -> torch.Tensor:
        """`part` "average": θ̄, the same on every process; "accumulator": the round's sum so far, which holds
        this process's shards only."""
        return getattr(self, part).cpu()

    def load_state_dict(self, part: str, state: torch.Tensor) -> None:
        getattr(self, part).copy_(state)
