"""Per-sample randomness: every random choice about one sample comes from its own CPU generator, seeded by a key
that names the sample (in training: seed, shard, epoch, position in that epoch's order; in eval: seed, sample index).

So a result depends neither on the device, nor on the number of processes or data-loading workers, nor on the
batch a sample shares, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# A training sample's two streams: one for its data (crop, flip, caption choice and rules), drawn in a
# data-loading worker, one for the model (latent sample, text-embedding noise, diffusion noise, timestep).
DATA, NOISE = 0, 1


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the key's numpy SeedSequence hash: nearby keys give unrelated streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def per_sample_randn(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[len(generators), *shape] standard normal, sample i drawn from generators[i] (on the CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def per_sample_randint(high: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One integer in [0, high) per sample, from its own generator."""
    return torch.stack([torch.randint(0, high, (), generator=g) for g in generators])
