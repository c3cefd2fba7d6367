"""Exact nearest-neighbour search over flattened images or embeddings, chunked so memory stays bounded; used by
near-duplicate detection, anchor choice and the memorization metrics alike.

Pure torch: callers flatten their data to ``[num_items, dim]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NORM_EPS = 1e-12  # same guard as torch.nn.functional.normalize


def default_device() -> torch.device:
    """The best available device: CUDA when present."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_search_args(queries: Tensor, refs: Tensor, k: int, metric: str,
                       query_chunk: int, ref_chunk: int) -> None:
    if queries.ndim != 2 or refs.ndim != 2 or queries.shape[1] != refs.shape[1]:
        raise ValueError(f"expected [M, D] and [N, D] tensors, got {tuple(queries.shape)} "
                         f"and {tuple(refs.shape)}")
    if not 1 <= k <= refs.shape[0]:
        raise ValueError(f"k must be in [1, {refs.shape[0]}] (number of references), got {k}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if query_chunk < 1 or ref_chunk < 1:
        raise ValueError("query_chunk and ref_chunk must be positive")


def nearest_neighbours(queries: Tensor, refs: Tensor, k: int, *, metric: str = "l2",
                       query_chunk: int = 1024, ref_chunk: int = 8192,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Exact k nearest ``refs`` per query: squared L2 ascending or cosine descending.

    Scores one ``query_chunk x ref_chunk`` block at a time, keeps its k best and merges them with the k best so
    far; returns CPU [M, k] tensors. A block costs one matrix product and one top-k, nothing more: for L2 the
    product is ``||r||^2 - 2 q.r`` (one addmm), which ranks references as the distance does, ``||q||^2`` being
    the same along a row; it is added to the k winners only.
    """
    _check_search_args(queries, refs, k, metric, query_chunk, ref_chunk)
    device = torch.device(device) if device is not None else default_device()
    largest = metric == "cosine"
    # Refs are converted (and normalised, for cosine) once rather than once per query chunk.
    ref_chunks = [(start, _prepared(refs[start:start + ref_chunk], device, dtype, metric))
                  for start in range(0, refs.shape[0], ref_chunk)]
    ref_norms_sq = [r.square().sum(1)[None, :] for _, r in ref_chunks] if metric == "l2" else None
    values, indices = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        q = _prepared(queries[q_start:q_start + query_chunk], device, dtype, metric)
        best_v = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for j, (r_start, r) in enumerate(ref_chunks):
            block = torch.addmm(ref_norms_sq[j], q, r.T, alpha=-2) if metric == "l2" else q @ r.T
            block_v, block_i = block.topk(min(k, block.shape[1]), dim=1, largest=largest)
            cand_v, cand_i = torch.cat([best_v, block_v], dim=1), torch.cat([best_i, block_i + r_start], dim=1)
            best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1, largest=largest)
            best_i = cand_i.gather(1, pos)
        if metric == "l2":
            # ||q||^2 - 2 q.r + ||r||^2 can dip below 0 by rounding error.
            best_v = best_v.add_(q.square().sum(1)[:, None]).clamp_(min=0)
        values.append(best_v.cpu())
        indices.append(best_i.cpu())
    return torch.cat(values), torch.cat(indices)


def _prepared(x: Tensor, device: torch.device, dtype: torch.dtype, metric: str) -> Tensor:
    """Rows on the device in the search dtype; unit length for cosine (a zero row stays zero)."""
    x = x.to(device, dtype)
    return x if metric == "l2" else x / x.norm(dim=1, keepdim=True).clamp_(min=_NORM_EPS)


def collapse_duplicates(refs: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of ``refs`` and, per original row, the index of its distinct row."""
    return torch.unique(refs, dim=0, return_inverse=True)


def first_occurrence(inverse: Tensor, num_unique: int) -> Tensor:
    """For each distinct row, the smallest original row index mapping to it."""
    first = torch.full((num_unique,), inverse.numel(), dtype=torch.long, device=inverse.device)
    rows = torch.arange(inverse.numel(), device=inverse.device)
    return first.scatter_reduce_(0, inverse, rows, reduce="amin")
