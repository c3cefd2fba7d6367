"""Exact and near-duplicate training images: find clusters, keep one copy, or shard clusters whole.

Pure torch: callers load and flatten the images and write the report.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor

from memmit.metrics import collapse_duplicates, nearest_neighbours

# Per-pixel RMS distance in [-1, 1] units (~6 grey levels): far above +-1 grey-level noise, far
# below the 0.16 between the closest of 64 distinct MNIST digits at 16x16 (among 5,000 of them,
# two pairs of near-identical plain "1" strokes do fall under it).
DEFAULT_THRESHOLD = 0.05
MAX_REPORTED_CLUSTERS = 50
# fp32 search scores ||q||^2 - 2 q.r + ||r||^2, whose rounding error is ~1e-7 * D for images in
# [-1, 1]; candidates within this slack of the threshold are re-measured exactly.
_SEARCH_SLACK = 1e-4


class _UnionFind:
    """Disjoint sets over 0..n-1 with path halving."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _candidate_pairs(distinct: Tensor, max_sq: float, k_max: int, query_chunk: int,
                     ref_chunk: int, device) -> Tensor:
    """Pairs (i < j) of distinct rows among each other's k_max nearest, within ``max_sq``."""
    k = min(distinct.shape[0], k_max + 1)  # + 1: a row finds itself too
    sq, idx = nearest_neighbours(distinct, distinct, k, query_chunk=query_chunk,
                                 ref_chunk=ref_chunk, device=device)
    rows = torch.arange(distinct.shape[0])[:, None].expand_as(idx)
    # Drop the query's own index, not the first column: rounding can rank another row first.
    keep = (idx != rows) & (sq <= max_sq)
    pairs = torch.stack([rows[keep], idx[keep]], dim=1).sort(dim=1).values
    return torch.unique(pairs, dim=0) if pairs.numel() else pairs


def _exact_sq_dists(rows: Tensor, pairs: Tensor, chunk: int) -> Tensor:
    """Squared L2 distance of each pair of ``rows``, from the difference in float64."""
    out = [(rows[p[:, 0]].double() - rows[p[:, 1]].double()).square().sum(1).cpu()
           for p in pairs.split(chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def find_duplicate_clusters(images: Tensor, threshold: float = DEFAULT_THRESHOLD, *,
                            k_max: int = 16, query_chunk: int = 1024, ref_chunk: int = 8192,
                            pair_chunk: int = 1024,
                            device: torch.device | str | None = None) -> list[list[int]]:
    """Clusters of sample ids (size >= 2) linked by RMS distance ||a - b|| / sqrt(D) <= threshold.

    Exact copies are grouped whole; near copies are searched among each distinct image's k_max
    nearest and merged transitively, so a near-copy cluster larger than k_max + 1 is joined only
    through chains of neighbours (which usually connect it, but may leave it split).
    Sorted by size descending, then first id.
    """
    if images.ndim != 2 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, D] tensor, got {tuple(images.shape)}")
    if threshold < 0 or k_max < 1:
        raise ValueError(f"need threshold >= 0 and k_max >= 1, got {threshold} and {k_max}")
    # Exact copies collapse for free, so the k-NN search only has to link near copies.
    distinct, inverse = collapse_duplicates(images)
    max_sq = threshold ** 2 * images.shape[1]
    sets = _UnionFind(distinct.shape[0])
    if distinct.shape[0] > 1:
        pairs = _candidate_pairs(distinct, max_sq + _SEARCH_SLACK * images.shape[1], k_max,
                                 query_chunk, ref_chunk, device)
        within = _exact_sq_dists(distinct, pairs, pair_chunk) <= max_sq
        for i, j in pairs[within].tolist():
            sets.union(i, j)
    groups: dict[int, list[int]] = {}
    for sample, row in enumerate(inverse.tolist()):
        groups.setdefault(sets.find(row), []).append(sample)
    clusters = [ids for ids in groups.values() if len(ids) >= 2]
    return sorted(clusters, key=lambda ids: (-len(ids), ids[0]))


def _units(num_samples: int, clusters: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each cluster as one unit, each other sample as its own; checks ids are valid and disjoint."""
    seen = [False] * num_samples
    units = []
    for cluster in clusters:
        for i in cluster:
            if not 0 <= i < num_samples or seen[i]:
                raise ValueError(f"sample id {i} is out of range or in two clusters")
            seen[i] = True
        units.append(sorted(cluster))
    units.extend([i] for i in range(num_samples) if not seen[i])
    return units


def keep_one(num_samples: int, clusters: Sequence[Sequence[int]]) -> list[int]:
    """Sample ids to train on: every non-duplicate and the smallest id of each cluster, sorted."""
    return sorted(unit[0] for unit in _units(num_samples, clusters))


def split_with_clusters(num_samples: int, num_shards: int, clusters: Sequence[Sequence[int]],
                        strategy: str = "random", seed: int = 0) -> list[list[int]]:
    """K disjoint shards covering 0..N-1, each cluster whole in one shard, sizes balanced.

    Shard sizes differ by at most the largest cluster's size.
    """
    if strategy != "random":
        raise ValueError(f"shard_strategy {strategy!r} cannot keep duplicate clusters together; "
                         "use 'random'")
    units = _units(num_samples, clusters)
    if not 1 <= num_shards <= len(units):
        raise ValueError(f"num_shards={num_shards} must be between 1 and {len(units)}, the number "
                         "of distinct samples (each duplicate cluster counts once)")
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    # Each unit goes to the currently smallest shard (ties: lowest index); empty shards fill first.
    sizes = [(0, k) for k in range(num_shards)]
    for u in order:
        size, k = heapq.heappop(sizes)
        shards[k].extend(units[u])
        heapq.heappush(sizes, (size + len(units[u]), k))
    return [sorted(s) for s in shards]


def cluster_report(clusters: Sequence[Sequence[int]], sources: Sequence[str]) -> dict:
    """JSON-friendly summary of duplicate clusters; the first 50 list their samples' sources."""
    return {"num_clusters": len(clusters),
            "num_samples_in_clusters": sum(len(c) for c in clusters),
            "largest_cluster": max((len(c) for c in clusters), default=0),
            "clusters": [{"size": len(c), "ids": list(c), "sources": [sources[i] for i in c]}
                         for c in clusters[:MAX_REPORTED_CLUSTERS]]}
