"""Memorization and sample-quality metrics on flattened images or embeddings.

Pure torch: callers load data, flatten it to ``[num_items, dim]`` and write reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data.neighbours import collapse_duplicates, default_device, first_occurrence, nearest_neighbours

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Somepalli et al. (2023) count a generation as a copy above this similarity.
COPY_COSINE = 0.5


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0/0 read as 0 (the sample coincides with its neighbours)."""
    return torch.where((num == 0) & (den == 0), torch.zeros_like(num), num / den)


def nn_ratio(sq_d1: Tensor, sq_d2: Tensor) -> Tensor:
    """L2 distance ratio d1/d2 from squared distances to the two nearest distinct images."""
    return _safe_ratio(sq_d1, sq_d2).sqrt()


def nn_ratio_memorized(sq_d1: Tensor, sq_d2: Tensor, threshold: float = 1 / 3) -> Tensor:
    """Memorized when d1/d2 < threshold (Yoon et al. 2023; Gu et al. 2023)."""
    # d2 == 0: an exact copy (d1 == 0) is memorized (ratio 0), anything else is not (ratio inf).
    return nn_ratio(sq_d1, sq_d2) < threshold


def neighbourhood_normalised_score(sq_dists_topk: Tensor) -> Tensor:
    """d1^2 over the mean of the k smallest squared distances (Carlini et al. 2023; MQ)."""
    return _safe_ratio(sq_dists_topk[:, 0], sq_dists_topk.mean(dim=1))


def memorized_fraction_by_threshold(scores: Tensor,
                                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                                    ) -> dict[float, float]:
    """Fraction of samples with ``score < t`` for each threshold ``t``."""
    return {float(t): (scores < t).double().mean().item() for t in thresholds}


def cosine_similarity_stats(max_cos: Tensor) -> dict[str, float]:
    """Mean, 95th percentile and fraction above 0.5 of per-sample max cosine similarity."""
    max_cos = max_cos.double()
    return {"mean": max_cos.mean().item(),
            "p95": torch.quantile(max_cos, 0.95).item(),
            "frac_above_0_5": (max_cos > COPY_COSINE).double().mean().item()}


def copied_counts(nearest_index: Tensor, mask: Tensor) -> dict[int, int]:
    """Training index -> number of flagged samples nearest to it, by count descending."""
    idx, counts = torch.unique(nearest_index[mask], return_counts=True)
    pairs = sorted(zip(idx.tolist(), counts.tolist()), key=lambda p: (-p[1], p[0]))
    return dict(pairs)


def _l2_report(values: Tensor, nearest: Tensor, threshold: float,
               thresholds: Sequence[float]) -> tuple[dict, dict]:
    ratio = nn_ratio(values[:, 0], values[:, 1])
    memorized = ratio < threshold
    scores = neighbourhood_normalised_score(values)
    per_sample = {"nearest_index": nearest, "d1": values[:, 0].sqrt(),
                  "d2": values[:, 1].sqrt(), "ratio": ratio, "memorized": memorized,
                  "nn_score": scores}
    summary = {"threshold": threshold,
               "fraction_memorized_ratio": memorized.double().mean().item(),
               "fraction_memorized_by_score": memorized_fraction_by_threshold(scores, thresholds),
               "copied_counts": copied_counts(nearest, memorized)}
    return summary, per_sample


def _cosine_report(values: Tensor, nearest: Tensor) -> tuple[dict, dict]:
    max_cos = values[:, 0]
    copied = max_cos > COPY_COSINE
    per_sample = {"nearest_index": nearest, "max_cos": max_cos, "copied": copied}
    summary = {"cosine": cosine_similarity_stats(max_cos),
               "copied_counts": copied_counts(nearest, copied)}
    return summary, per_sample


def memorization_report(samples: Tensor, train: Tensor, *, k: int = 50,
                        threshold: float = 1 / 3, metric: str = "l2",
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        query_chunk: int = 1024, ref_chunk: int = 8192,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Nearest-neighbour memorization report of ``samples`` against distinct ``train`` rows.

    Returns ``{"summary": JSON-friendly dict, "per_sample": dict of CPU tensors [M]}``.
    """
    if metric == "l2" and k < 2:
        raise ValueError(f"the d1/d2 criterion needs k >= 2, got {k}")
    unique, inverse = collapse_duplicates(train)
    num_unique = unique.shape[0]
    if metric == "l2" and num_unique < 2:
        raise ValueError("the d1/d2 criterion needs at least two distinct training images")
    # k is clipped to the number of distinct images; cosine only needs the nearest one.
    k_used = min(k, num_unique) if metric == "l2" else 1
    values, unique_idx = nearest_neighbours(samples, unique, k_used, metric=metric,
                                            query_chunk=query_chunk, ref_chunk=ref_chunk,
                                            device=device, dtype=dtype)
    nearest = first_occurrence(inverse.cpu(), num_unique)[unique_idx[:, 0]]
    if metric == "l2":
        summary, per_sample = _l2_report(values, nearest, threshold, thresholds)
    else:
        summary, per_sample = _cosine_report(values, nearest)
    header = {"metric": metric, "num_samples": samples.shape[0], "num_train": train.shape[0],
              "num_distinct_train": num_unique, "k": k_used}
    return {"summary": {**header, **summary}, "per_sample": per_sample}


def nearest_per_cluster(queries: Tensor, refs: Tensor, labels: Tensor, k: int, *, query_chunk: int = 256,
                        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Per query, the k smallest squared L2 distances to clusters of ``refs`` (``labels``: each ref's cluster in
    0..C-1; a cluster is as near as its nearest member), ascending, and the index of the nearest ref.

    A family of near copies counts once, so a copy of one member has a distinct image, not a sibling, as its
    second neighbour. Holds a ``query_chunk x N`` block and a ``query_chunk x C`` one at a time; CPU results.
    """
    num_clusters = int(labels.max()) + 1
    if not 1 <= k <= num_clusters:
        raise ValueError(f"k must be in [1, {num_clusters}] (number of clusters), got {k}")
    device = torch.device(device) if device is not None else default_device()
    refs_d, labels_d = refs.to(device, torch.float32), labels.to(device)
    refs_sq = refs_d.square().sum(1)
    values, nearest = [], []
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start:start + query_chunk].to(device, torch.float32)
        # nearest_neighbours' formula, operation for operation.
        sq = torch.addmm(refs_sq[None, :], q, refs_d.T, alpha=-2).add_(q.square().sum(1)[:, None]).clamp_(min=0)
        per_cluster = torch.full((q.shape[0], num_clusters), float("inf"), device=device)
        per_cluster.scatter_reduce_(1, labels_d.expand(q.shape[0], -1), sq, reduce="amin")
        values.append(per_cluster.topk(k, dim=1, largest=False).values.cpu())
        nearest.append(sq.argmin(1).cpu())
    return torch.cat(values), torch.cat(nearest)


def exact_clusters(items: Tensor) -> list[list[int]]:
    """Groups (size >= 2) of identical rows, by first index."""
    _, inverse = collapse_duplicates(items)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(inverse.tolist()):
        groups.setdefault(row, []).append(i)
    return sorted((g for g in groups.values() if len(g) >= 2), key=lambda g: g[0])


def cluster_labels(num_items: int, clusters: Sequence[Sequence[int]]) -> Tensor:
    """Each item's cluster id: the clusters first (0..len-1), then every other item on its own."""
    labels = torch.full((num_items,), -1, dtype=torch.long)
    for c, members in enumerate(clusters):
        labels[list(members)] = c
    alone = labels < 0
    labels[alone] = torch.arange(len(clusters), len(clusters) + int(alone.sum()))
    return labels


def cluster_memorization_report(samples: Tensor, train: Tensor, clusters: Sequence[Sequence[int]], *, k: int = 50,
                                threshold: float = 1 / 3, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                                device: torch.device | str | None = None) -> dict[str, dict]:
    """The d1/d2 and neighbourhood criteria with one neighbour per near-duplicate cluster of ``train``:
    d1 = distance to the nearest training image, d2 = to the nearest one outside its cluster.

    Returns ``{"summary": JSON-friendly dict, "per_sample": dict of CPU tensors [M]}``; "cluster" is the
    nearest image's cluster id (``cluster_labels`` order) and "cluster_size" its size.
    """
    labels = cluster_labels(train.shape[0], clusters)
    num_clusters = int(labels.max()) + 1
    if k < 2:
        raise ValueError(f"the d1/d2 criterion needs k >= 2, got {k}")
    if num_clusters < 2:
        raise ValueError("the d1/d2 criterion needs at least two distinct clusters of training images")
    k_used = min(k, num_clusters)
    values, nearest = nearest_per_cluster(samples, train, labels, k_used, device=device)
    summary, per_sample = _l2_report(values, nearest, threshold, thresholds)
    sizes = torch.bincount(labels)
    per_sample["cluster"] = labels[nearest]
    per_sample["cluster_size"] = sizes[per_sample["cluster"]]
    header = {"metric": "l2", "num_samples": samples.shape[0], "num_train": train.shape[0],
              "num_clusters": num_clusters, "k": k_used}
    return {"summary": {**header, **summary}, "per_sample": per_sample}


def _gaussian_fit(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of ``feats`` [n, d] in float64."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected [n >= 2, d] features, got {tuple(feats.shape)}")
    feats = feats.double()
    mu = feats.mean(dim=0)
    centred = feats - mu
    return mu, centred.T @ centred / (feats.shape[0] - 1)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError("feature sets must be [n, d] and [m, d] with the same d")
    mu_a, sigma_a = _gaussian_fit(feats_a)
    mu_b, sigma_b = _gaussian_fit(feats_b)
    # ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), the trace of the root as the sum of the roots of
    # S_a S_b's eigenvalues: written out because torchmetrics has no public functional FID (its metric computes
    # this, in this order, in a private function).
    mean_term = (mu_a - mu_b).square().sum(dim=-1)
    trace_root = torch.linalg.eigvals(sigma_a @ sigma_b).sqrt().real.sum(dim=-1)
    return (mean_term + (sigma_a.trace() + sigma_b.trace()) - 2 * trace_root).item()
