"""Exact and near-duplicate training images: clusters of rows whose features lie within a threshold.

Pure torch: callers load and flatten the images and write the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .neighbours import collapse_duplicates, index_nearest_neighbours, nearest_neighbours, resolve_search

MAX_REPORTED_CLUSTERS = 50
Distance = Callable[[Tensor, Tensor], Tensor]  # paired rows [P, D], [P, D] -> distances [P]


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel RMS distance ||a_i - b_i|| / sqrt(D) of paired rows, in float64."""
    return (a.double() - b.double()).square().mean(1).sqrt()


def _candidate_pairs(distinct: Tensor, k_max: int, metric: str, search: str, query_chunk: int, ref_chunk: int,
                     device) -> Tensor:
    """Pairs (i < j) of distinct rows among each other's k_max nearest in the search metric (exactly, or by a
    faiss index: neighbours.resolve_search)."""
    k = min(distinct.shape[0], k_max + 1)  # + 1: a row finds itself too
    search = resolve_search(search, distinct.shape[0])
    if search == "exact":
        _, idx = nearest_neighbours(distinct, distinct, k, metric=metric, query_chunk=query_chunk,
                                    ref_chunk=ref_chunk, device=device)
    else:
        _, idx = index_nearest_neighbours(distinct, k, search, metric)
    rows = torch.arange(distinct.shape[0])[:, None].expand_as(idx)
    # Drop the query's own index, not the first column: rounding can rank another row first; -1: not found.
    keep = (idx != rows) & (idx >= 0)
    pairs = torch.stack([rows[keep], idx[keep]], dim=1).sort(dim=1).values
    return torch.unique(pairs, dim=0) if pairs.numel() else pairs


def _cross_distances(rows: Tensor, a: list[int], b: list[int], distance: Distance) -> Tensor:
    ia = torch.tensor(a).repeat_interleave(len(b))
    ib = torch.tensor(b).repeat(len(a))
    return distance(rows[ia], rows[ib])


def find_duplicate_clusters(features: Tensor, threshold: float,
                            distance: Distance = rms_distance, *, search_metric: str = "l2", k_max: int = 16,
                            search: str = "auto", query_chunk: int = 1024, ref_chunk: int = 8192,
                            pair_chunk: int = 4096, device: torch.device | str | None = None) -> list[list[int]]:
    """Clusters of sample ids (size >= 2): families of near copies, by average linkage.

    Identical feature rows are grouped whole. Near copies are searched among each distinct row's k_max
    nearest (in `search_metric`; `search`: exact, or a faiss index beyond neighbours.EXACT_MAX rows, so memory
    and work grow about linearly with the rows) and measured exactly with `distance` (paired rows -> [P]); pairs within
    `threshold` are taken closest first, and their two clusters join when the mean distance over all their
    cross pairs is within the threshold too. So a chain of pairwise-close but end-to-end distinct images
    never becomes one cluster (single linkage's failure), while a family of variants, whose members can
    differ from each other by more than from their source (web-style copies), still does (complete
    linkage's). Sorted by size descending, then first id. The threshold is the detector's (detectors.py holds
    the measured defaults).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, D] tensor, got {tuple(features.shape)}")
    if threshold < 0 or k_max < 1:
        raise ValueError(f"need threshold >= 0 and k_max >= 1, got {threshold} and {k_max}")
    # Exact copies collapse for free, so the search only has to link near copies.
    distinct, inverse = collapse_duplicates(features)
    members = {i: [i] for i in range(distinct.shape[0])}
    owner = list(range(distinct.shape[0]))
    if distinct.shape[0] > 1:
        pairs = _candidate_pairs(distinct, k_max, search_metric, search, query_chunk, ref_chunk, device)
        dists = torch.cat([distance(distinct[p[:, 0]], distinct[p[:, 1]]).cpu() for p in pairs.split(pair_chunk)]
                          ) if pairs.numel() else torch.empty(0, dtype=torch.float64)
        close = dists <= threshold
        for _, (i, j) in sorted(zip(dists[close].tolist(), pairs[close].tolist())):
            a, b = owner[i], owner[j]
            if a == b or float(_cross_distances(distinct, members[a], members[b], distance).mean()) > threshold:
                continue
            if len(members[a]) < len(members[b]):
                a, b = b, a
            for m in members.pop(b):
                owner[m] = a
                members[a].append(m)
    groups: dict[int, list[int]] = {}
    for sample, row in enumerate(inverse.tolist()):
        groups.setdefault(owner[row], []).append(sample)
    clusters = [ids for ids in groups.values() if len(ids) >= 2]
    return sorted(clusters, key=lambda ids: (-len(ids), ids[0]))


def merge_overlapping(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The union of groups that share a member, sorted as find_duplicate_clusters sorts clusters."""
    owner: dict[int, int] = {}
    merged: dict[int, set[int]] = {}
    for g, group in enumerate(groups):
        targets = {owner[i] for i in group if i in owner}
        members = set(group).union(*(merged.pop(t) for t in targets))
        merged[g] = members
        for i in members:
            owner[i] = g
    return sorted((sorted(m) for m in merged.values()), key=lambda ids: (-len(ids), ids[0]))


def cluster_report(clusters: Sequence[Sequence[int]], sources: Sequence[str]) -> dict:
    """JSON-friendly summary of duplicate clusters; the first 50 list their samples' sources."""
    return {"num_clusters": len(clusters),
            "num_samples_in_clusters": sum(len(c) for c in clusters),
            "largest_cluster": max((len(c) for c in clusters), default=0),
            "clusters": [{"size": len(c), "ids": list(c), "sources": [sources[i] for i in c]}
                         for c in clusters[:MAX_REPORTED_CLUSTERS]]}
